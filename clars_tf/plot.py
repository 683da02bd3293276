"""Plot the training curves and trust ratios of train_imagenet.py runs.

    python -m clars_tf.plot runs/resnet50_32k_clars runs/resnet50_32k_lars \\
        --labels=CLARS,LARS --output_dir=plots

writes two PNG files to `--output_dir` (default: the first run directory):

- `training_curves.png`: top-1 accuracy and loss against epoch, one colour per
  run, with training as solid lines and evaluation as dashed lines.
- `trust_ratios.png`: a heatmap of one run's trust ratios (`--heatmap_run`,
  default the first run). Rows are variables in model order, columns are
  diagnostics steps, and the colour scale is logarithmic.

A run directory is the `--model_dir` of train_imagenet.py. This module reads
its `metrics.jsonl` (one JSON object per epoch) and `diagnostics.jsonl` (one
JSON object per diagnostics step, with `trust_ratio` mapping variable paths to
floats). It works on a run that is still writing: an incomplete last line is
skipped with a warning, and a run without a finished epoch is left out.

matplotlib is imported only when a figure is drawn, and always with the Agg
backend, so the module works without a display.
"""

import argparse
import dataclasses
import json
import logging
import math
import re
import sys
import types
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
CURVES_FILE = "training_curves.png"
HEATMAP_FILE = "trust_ratios.png"

# Last path components of the rank <= 1 trainable variables of Keras layers:
# biases and normalization scales and offsets. diagnostics.jsonl stores no
# shapes, so the heatmap infers rank from these names.
# NOTE: checked for the six models of clars_tf.models with Keras 3.15, where
# every other trainable variable is a `kernel` of rank 2 or more. A custom
# layer with other rank-1 names needs --heatmap_variables.
RANK_ONE_VARIABLE_NAMES = frozenset({"bias", "gamma", "beta"})

# Tick labels beyond these counts overlap, so only every n-th row or column
# gets one.
MAX_ROW_LABELS = 40
MAX_COLUMN_LABELS = 10

DEFAULT_CURVES_SIZE = (12.0, 5.0)
DEFAULT_HEATMAP_SIZE = (12.0, 8.0)
DEFAULT_DPI = 100

# Python types that json.loads returns for the JSON types that records need.
_JSON_TYPES = {"number": (int, float), "object": dict}


@dataclasses.dataclass
class RunCurves:
    """The per-epoch records of one run and the label of its lines."""

    label: str
    records: list[dict]


# --- Reading run files -----------------------------------------------------------


def read_json_lines(path: Path, required_keys: Mapping[str, str] | None = None) -> list[dict]:
    """Read a JSON Lines file into a list of dicts, skipping blank lines.

    `required_keys` maps keys that every record must have to their JSON type,
    "number" or "object". An invalid last line is skipped with a warning,
    because a run that is still writing can leave it incomplete. Any other
    invalid line, a line that is not a JSON object, or a missing or mistyped
    required key raises ValueError naming the file and the line.

    Raises:
        FileNotFoundError: if `path` is not a file.
        ValueError: for a malformed line other than the last one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")

    numbered_lines = [
        (number, line)
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if line.strip()
    ]
    records = []
    for position, (number, line) in enumerate(numbered_lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if position == len(numbered_lines) - 1:
                logger.warning(
                    "Skipped line %d of %s, which is not valid JSON (%s). A run that "
                    "is still writing leaves its last line incomplete.",
                    number, path, error.msg,
                )
                continue
            raise ValueError(
                f"{path}, line {number}: invalid JSON ({error.msg}). Repair or delete "
                "that line."
            ) from None
        _check_record(record, required_keys, path, number)
        records.append(record)
    return records


def _check_record(record, required_keys, path: Path, number: int) -> None:
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}, line {number}: expected a JSON object, found "
            f"{type(record).__name__}."
        )
    for key, expected_type in (required_keys or {}).items():
        if key not in record:
            raise ValueError(f"{path}, line {number}: the record has no {key!r} key.")
        value = record[key]
        # JSON true and false load as bool, a subclass of int.
        if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[expected_type]):
            raise ValueError(
                f"{path}, line {number}: {key!r} has the invalid value {value!r}, "
                f"but a JSON {expected_type} is expected."
            )


def _run_file(run_dir: Path, name: str, written_when: str) -> Path:
    """Return `run_dir / name`, or raise FileNotFoundError naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"Run directory {run_dir} does not exist or is not a directory. Pass the "
            "--model_dir of a train_imagenet.py run."
        )
    path = run_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found. train_imagenet.py writes it {written_when}.")
    return path


def _keep_last_by(records: Iterable[dict], key: str) -> list[dict]:
    """Sort records by `key`, keeping the last record for each value of it."""
    by_value = {}
    for record in records:
        by_value[record[key]] = record
    return [by_value[value] for value in sorted(by_value)]


def load_metrics(run_dir: str | Path) -> list[dict]:
    """Load a run's per-epoch records from metrics.jsonl, sorted by epoch.

    Where an epoch appears twice, the later record wins.

    Raises:
        FileNotFoundError: if the run directory or its metrics.jsonl is missing.
        ValueError: for a malformed record other than the last line.
    """
    path = _run_file(Path(run_dir), METRICS_FILE, "at the end of every epoch")
    records = read_json_lines(path, required_keys={"epoch": "number"})
    return _keep_last_by(records, "epoch")


def load_diagnostics(run_dir: str | Path) -> list[dict]:
    """Load a run's diagnostics records from diagnostics.jsonl, sorted by step.

    Where a step appears twice, the later record wins.

    Raises:
        FileNotFoundError: if the run directory or its diagnostics.jsonl is missing.
        ValueError: for a malformed record other than the last line.
    """
    path = _run_file(
        Path(run_dir),
        DIAGNOSTICS_FILE,
        "every --diagnostics_every_steps steps (unless that flag is 0)",
    )
    records = read_json_lines(path, required_keys={"step": "number", "trust_ratio": "object"})
    return _keep_last_by(records, "step")


# --- Trust-ratio matrix ----------------------------------------------------------


def variable_paths_in_order(diagnostics: Sequence[dict]) -> list[str]:
    """Return every variable path of the records, in order of first appearance.

    train_imagenet.py writes the paths in the order of the model's trainable
    variables, so this is model order.
    """
    paths = {}
    for record in diagnostics:
        for path in record["trust_ratio"]:
            paths.setdefault(path, None)
    return list(paths)


def select_heatmap_variables(paths: Iterable[str], pattern: str | None = None) -> list[str]:
    """Return the variable paths that the heatmap shows, keeping their order.

    With `pattern=None`, every variable of rank > 1 (convolution and dense
    kernels), with the rank inferred from the name as `RANK_ONE_VARIABLE_NAMES`
    describes. Otherwise the paths in which the regular expression `pattern`
    matches (`re.search`).

    Raises:
        ValueError: if `pattern` is not a valid regular expression.
    """
    if pattern is None:
        return [path for path in paths if path.rsplit("/", 1)[-1] not in RANK_ONE_VARIABLE_NAMES]
    try:
        expression = re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"--heatmap_variables={pattern!r} is not a valid regular expression: {error}."
        ) from None
    return [path for path in paths if expression.search(path)]


def trust_ratio_matrix(diagnostics: Sequence[dict], paths: Sequence[str]) -> np.ndarray:
    """Return the trust ratios as a float array of shape [len(paths), len(diagnostics)].

    Entry [i, j] is the ratio of `paths[i]` in record j, or NaN where that
    record has no numeric value for the path.
    """
    matrix = np.full((len(paths), len(diagnostics)), np.nan)
    for column, record in enumerate(diagnostics):
        ratios = record["trust_ratio"]
        for row, path in enumerate(paths):
            value = ratios.get(path)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                matrix[row, column] = float(value)
    return matrix


def _log_color_range(matrix: np.ndarray) -> tuple[float, float]:
    """Return (vmin, vmax) of the positive finite entries for a log colour scale.

    A constant matrix, such as the all-1 ratios of an SGD run, gets one decade
    on each side so that the scale is not empty.

    Raises:
        ValueError: if no entry is positive and finite.
    """
    positive = matrix[np.isfinite(matrix) & (matrix > 0)]
    if positive.size == 0:
        raise ValueError(
            "The selected variables have no positive trust ratio, which a log colour "
            "scale needs."
        )
    low, high = float(positive.min()), float(positive.max())
    if low == high:
        return low / 10.0, high * 10.0
    return low, high


# --- Drawing ----------------------------------------------------------------------


def _load_matplotlib() -> types.SimpleNamespace:
    """Import the matplotlib classes this module draws with, on the Agg backend.

    The figures are built from `matplotlib.figure.Figure` with an Agg canvas,
    without pyplot, so the process's pyplot backend stays as it was.

    Raises:
        ImportError: naming the install command if matplotlib is missing.
    """
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "clars_tf.plot needs matplotlib, which is not installed. Install it with "
            'pip install -e ".[plot]" in the clars_tf repository, or pip install '
            f"matplotlib. The import failed with: {error}"
        ) from error
    return types.SimpleNamespace(
        Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, LogNorm=LogNorm, colormaps=colormaps
    )


def _new_figure(figure_size: tuple[float, float], dpi: int):
    matplotlib = _load_matplotlib()
    figure = matplotlib.Figure(figsize=figure_size, dpi=dpi, layout="constrained")
    matplotlib.FigureCanvasAgg(figure)
    return figure


def _save(figure, output_path: Path, dpi: int) -> Path:
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # No bbox_inches="tight": the PNG keeps exactly figure_size * dpi pixels.
    figure.savefig(output_path, dpi=dpi, format="png")
    return output_path


def _series(records: Sequence[dict], key: str, scale: float = 1.0) -> tuple[list, list]:
    """Return (epochs, values) of the records that contain a numeric `key`."""
    epochs, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            epochs.append(record["epoch"])
            values.append(value * scale)
    return epochs, values


def draw_training_curves(
    runs: Sequence[RunCurves],
    *,
    figure_size: tuple[float, float] = DEFAULT_CURVES_SIZE,
    dpi: int = DEFAULT_DPI,
):
    """Draw top-1 accuracy and loss against epoch for each run on a new Figure.

    The left axes show top-1 in percent and the right axes the loss. Training
    values are solid lines labelled "<label> train", and evaluation values are
    dashed lines with markers labelled "<label> eval", in one colour per run.
    A run whose records have no evaluation gets only the training lines, and
    runs without records are left out.

    Returns:
        A `matplotlib.figure.Figure` with an Agg canvas.

    Raises:
        ValueError: if no run has a record.
        ImportError: if matplotlib is missing.
    """
    runs = [run for run in runs if run.records]
    if not runs:
        raise ValueError("No run has a finished epoch to plot.")

    figure = _new_figure(figure_size, dpi)
    top1_axes, loss_axes = figure.subplots(1, 2)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        for axes, key, scale in ((top1_axes, "top1", 100.0), (loss_axes, "loss", 1.0)):
            axes.plot(*_series(run.records, key, scale), color=color, label=f"{run.label} train")
            eval_epochs, eval_values = _series(run.records, f"eval_{key}", scale)
            if eval_epochs:
                axes.plot(
                    eval_epochs, eval_values, color=color, linestyle="--", marker="o",
                    markersize=3, label=f"{run.label} eval",
                )

    top1_axes.set(title="Top-1 accuracy", xlabel="epoch", ylabel="top-1 accuracy (%)")
    loss_axes.set(title="Loss", xlabel="epoch", ylabel="loss")
    for axes in (top1_axes, loss_axes):
        axes.grid(True, alpha=0.3)
    top1_axes.legend(fontsize="small")
    return figure


def plot_training_curves(
    runs: Sequence[RunCurves],
    output_path: str | Path,
    *,
    figure_size: tuple[float, float] = DEFAULT_CURVES_SIZE,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Draw the training curves of `draw_training_curves` and save them as a PNG.

    Returns:
        The path of the written PNG, of `figure_size * dpi` pixels.
    """
    figure = draw_training_curves(runs, figure_size=figure_size, dpi=dpi)
    return _save(figure, output_path, dpi)


def _set_sparse_ticks(axes, count: int, labels: Sequence, max_labels: int, axis: str) -> None:
    """Label every n-th row or column so that at most `max_labels` labels show."""
    stride = max(1, math.ceil(count / max_labels))
    positions = list(range(0, count, stride))
    tick_labels = [str(labels[position]) for position in positions]
    if axis == "y":
        axes.set_yticks(positions, tick_labels, fontsize=7)
    else:
        axes.set_xticks(positions, tick_labels)


def draw_trust_ratio_heatmap(
    diagnostics: Sequence[dict],
    *,
    variable_pattern: str | None = None,
    title: str = "Trust ratios",
    figure_size: tuple[float, float] = DEFAULT_HEATMAP_SIZE,
    dpi: int = DEFAULT_DPI,
):
    """Draw the trust ratios of one run as a heatmap on a new Figure.

    Rows are the variables that `select_heatmap_variables(paths,
    variable_pattern)` keeps, in model order, and columns are the diagnostics
    records in step order. Colours follow a log scale. Missing, zero, negative
    and non-finite ratios are masked and drawn in grey.

    Returns:
        A `matplotlib.figure.Figure` with an Agg canvas.

    Raises:
        ValueError: if there are no records, no variable is selected, or no
            selected ratio is positive.
        ImportError: if matplotlib is missing.
    """
    if not diagnostics:
        raise ValueError("There are no diagnostics records to plot.")
    paths = select_heatmap_variables(variable_paths_in_order(diagnostics), variable_pattern)
    if not paths:
        selection = (
            "has no variable of rank > 1" if variable_pattern is None
            else f"has no variable that matches --heatmap_variables={variable_pattern!r}"
        )
        raise ValueError(f"The diagnostics {selection}.")

    matrix = trust_ratio_matrix(diagnostics, paths)
    vmin, vmax = _log_color_range(matrix)
    masked = np.ma.masked_where(~(np.isfinite(matrix) & (matrix > 0)), matrix)

    matplotlib = _load_matplotlib()
    figure = _new_figure(figure_size, dpi)
    axes = figure.subplots()
    image = axes.imshow(
        masked,
        aspect="auto",
        interpolation="nearest",
        cmap=matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey"),
        norm=matplotlib.LogNorm(vmin=vmin, vmax=vmax),
    )

    steps = [record["step"] for record in diagnostics]
    _set_sparse_ticks(axes, len(paths), paths, MAX_ROW_LABELS, axis="y")
    _set_sparse_ticks(axes, len(steps), steps, MAX_COLUMN_LABELS, axis="x")
    axes.set(title=title, xlabel="training step", ylabel="variable (model order)")
    figure.colorbar(image, ax=axes, label="trust ratio (log scale)")
    return figure


def plot_trust_ratio_heatmap(
    diagnostics: Sequence[dict],
    output_path: str | Path,
    *,
    variable_pattern: str | None = None,
    title: str = "Trust ratios",
    figure_size: tuple[float, float] = DEFAULT_HEATMAP_SIZE,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Draw the heatmap of `draw_trust_ratio_heatmap` and save it as a PNG.

    Returns:
        The path of the written PNG, of `figure_size * dpi` pixels.
    """
    figure = draw_trust_ratio_heatmap(
        diagnostics, variable_pattern=variable_pattern, title=title,
        figure_size=figure_size, dpi=dpi,
    )
    return _save(figure, output_path, dpi)


# --- Command line -----------------------------------------------------------------


def _figure_size(text: str) -> tuple[float, float]:
    """Parse a figure size `WIDTHxHEIGHT` in inches, such as `12x5`."""
    try:
        width, height = (float(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid figure size {text!r}: use WIDTHxHEIGHT in inches, such as 12x5"
        ) from None
    if not (width > 0 and height > 0):
        raise argparse.ArgumentTypeError(f"invalid figure size {text!r}: both sides must be > 0")
    return width, height


def _positive_int(text: str) -> int:
    """Parse a positive integer command-line value."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python -m clars_tf.plot`."""
    parser = argparse.ArgumentParser(
        prog="python -m clars_tf.plot",
        description=(
            "Plot top-1 accuracy and loss of train_imagenet.py runs against epoch, and "
            "a heatmap of one run's trust ratios."
        ),
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR",
        help="--model_dir of a train_imagenet.py run, containing metrics.jsonl.",
    )
    parser.add_argument(
        "--labels",
        help="Comma-separated legend labels, one per RUN_DIR. Default: the directory names.",
    )

    parser.add_argument(
        "--output_dir",
        help=f"Folder for {CURVES_FILE} and {HEATMAP_FILE}. Default: the first RUN_DIR.",
    )

    parser.add_argument(
        "--heatmap_run",
        help="Run directory whose diagnostics.jsonl the heatmap shows. Default: the first RUN_DIR.",
    )
    parser.add_argument(
        "--heatmap_variables", metavar="REGEX",
        help=(
            "Regular expression searched in variable paths. The heatmap shows the "
            "variables that match. Default: every variable of rank > 1."
        ),
    )
    parser.add_argument(
        "--skip_heatmap", action="store_true",
        help="Write only the training curves, for runs without diagnostics.jsonl.",
    )

    parser.add_argument(
        "--curves_size", type=_figure_size, default=DEFAULT_CURVES_SIZE, metavar="WxH",
        help="Size of the training-curves figure in inches. Default: 12x5.",
    )
    parser.add_argument(
        "--heatmap_size", type=_figure_size, default=DEFAULT_HEATMAP_SIZE, metavar="WxH",
        help="Size of the heatmap figure in inches. Default: 12x8.",
    )
    parser.add_argument(
        "--dpi", type=_positive_int, default=DEFAULT_DPI,
        help="Pixels per inch of both PNG files. Default: 100.",
    )
    return parser


def _run_labels(run_dirs: Sequence[Path], labels: str | None) -> list[str]:
    """Return one label per run: the `--labels` entries, or the directory names."""
    if labels is None:
        names = [run_dir.resolve().name for run_dir in run_dirs]
        if len(set(names)) < len(names):
            # Two runs with the same folder name stay apart by their full paths.
            return [str(run_dir) for run_dir in run_dirs]
        return names
    entries = [entry.strip() for entry in labels.split(",")]
    if len(entries) != len(run_dirs):
        raise ValueError(
            f"--labels={labels!r} has {len(entries)} entries for {len(run_dirs)} run "
            "directories. Give one label per RUN_DIR, separated by commas."
        )
    return entries


def _load_curves(run_dirs: Sequence[Path], labels: Sequence[str]) -> list[RunCurves]:
    runs = []
    for run_dir, label in zip(run_dirs, labels):
        records = load_metrics(run_dir)
        if not records:
            logger.warning(
                "%s has no finished epoch yet, so run %r is left out of the curves.",
                run_dir / METRICS_FILE, label,
            )
        runs.append(RunCurves(label, records))
    return runs


def _heatmap_label(heatmap_run: Path, run_dirs: Sequence[Path], labels: Sequence[str]) -> str:
    """Return the label of the heatmap run: its curve label, or its directory name."""
    if heatmap_run in run_dirs:
        return labels[run_dirs.index(heatmap_run)]
    return heatmap_run.resolve().name


def plot_runs(args: argparse.Namespace) -> list[Path]:
    """Write the figures that the parsed command-line arguments describe.

    Every input file is read before any figure is drawn, so a missing file
    stops the command before it writes anything.

    Returns:
        The paths of the written PNG files.
    """
    run_dirs = [Path(run_dir) for run_dir in args.run_dirs]
    labels = _run_labels(run_dirs, args.labels)
    output_dir = Path(args.output_dir) if args.output_dir else run_dirs[0]

    runs = _load_curves(run_dirs, labels)
    diagnostics = None
    if not args.skip_heatmap:
        heatmap_run = Path(args.heatmap_run) if args.heatmap_run else run_dirs[0]
        try:
            diagnostics = load_diagnostics(heatmap_run)
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"{error} Pass --heatmap_run with a run that has diagnostics, or "
                "--skip_heatmap."
            ) from None
        heatmap_title = f"Trust ratios: {_heatmap_label(heatmap_run, run_dirs, labels)}"

    written = [
        plot_training_curves(
            runs, output_dir / CURVES_FILE, figure_size=args.curves_size, dpi=args.dpi
        )
    ]
    if diagnostics is not None:
        written.append(
            plot_trust_ratio_heatmap(
                diagnostics,
                output_dir / HEATMAP_FILE,
                variable_pattern=args.heatmap_variables,
                title=heatmap_title,
                figure_size=args.heatmap_size,
                dpi=args.dpi,
            )
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status: 0, or 1 after an error."""
    args = build_parser().parse_args(argv)
    try:
        written = plot_runs(args)
    except (FileNotFoundError, ValueError, ImportError) as error:
        print(f"clars_tf.plot: error: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    sys.exit(main())
