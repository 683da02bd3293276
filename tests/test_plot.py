"""Tests for `python -m clars_tf.plot` on run directories generated in tmp_path.

The expected pixel sizes come from the figure-size flags (inches times dpi),
the expected curves and heatmap values from the records the tests write, and
the expected heatmap rows from the shapes of real Keras model variables.
"""

import importlib
import json
import logging
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from clars_tf import plot
from clars_tf.models import build_model

CURVES = plot.CURVES_FILE
HEATMAP = plot.HEATMAP_FILE

VARIABLE_PATHS = [
    "conv1/kernel",
    "conv1/bias",
    "bn1/gamma",
    "bn1/beta",
    "block1_conv/kernel",
    "logits/kernel",
    "logits/bias",
]
KERNEL_PATHS = ["conv1/kernel", "block1_conv/kernel", "logits/kernel"]


# --- Run-directory builders ---------------------------------------------------------


def metrics_record(epoch, with_eval):
    """Return one metrics.jsonl record with values that differ per epoch."""
    record = {
        "epoch": epoch,
        "step": epoch * 10,
        "loss": 4.0 / epoch,
        "top1": 0.05 * epoch,
        "top5": 0.08 * epoch,
        "learning_rate": 0.1 / epoch,
        "images_per_second": 1000.0 + epoch,
        "wall_time": 30.0 * epoch,
    }
    if with_eval:
        record.update(eval_loss=4.5 / epoch, eval_top1=0.04 * epoch, eval_top5=0.07 * epoch)
    return record


def write_lines(path, records, tail=""):
    """Write records as JSON Lines, then `tail` verbatim (an unfinished line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text + tail, encoding="utf-8")


def make_run(root, name, epochs=4, eval_epochs=(2, 4), diagnostics_steps=(0, 10, 20)):
    """Create a run directory with metrics.jsonl and, unless steps are empty, diagnostics.jsonl."""
    run_dir = root / name
    records = [metrics_record(epoch, epoch in eval_epochs) for epoch in range(1, epochs + 1)]
    write_lines(run_dir / plot.METRICS_FILE, records)
    if diagnostics_steps:
        write_lines(run_dir / plot.DIAGNOSTICS_FILE, diagnostics_records(diagnostics_steps))
    return run_dir


def ratio_value(row, step):
    """Return a distinct positive trust ratio for variable `row` at `step`."""
    return 10.0 ** (-(row + 1)) * (1.0 + step / 100.0)


def diagnostics_records(steps, paths=VARIABLE_PATHS):
    records = []
    for step in steps:
        ratios = {path: ratio_value(row, step) for row, path in enumerate(paths)}
        norms = {path: 1.0 for path in paths}
        records.append(
            {"step": step, "epoch": step / 10, "trust_ratio": ratios,
             "complete_norm": norms, "gradient_norm": norms}
        )
    return records


def png_size(path):
    """Return (width, height) of a PNG file, read back with PIL."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


# --- Written files --------------------------------------------------------------------


def test_curves_png_size_from_flags(tmp_path):
    first = make_run(tmp_path, "clars")
    second = make_run(tmp_path, "lars")

    status = plot.main([str(first), str(second), "--curves_size=10x4", "--dpi=50",
                        "--skip_heatmap"])

    output = first / CURVES
    assert status == 0
    assert output.stat().st_size > 0
    assert png_size(output) == (10 * 50, 4 * 50)
    assert not (first / HEATMAP).exists()


def test_heatmap_png_size_from_flags(tmp_path):
    run_dir = make_run(tmp_path, "clars")

    status = plot.main([str(run_dir), "--heatmap_size=6x3", "--dpi=80"])

    output = run_dir / HEATMAP
    assert status == 0
    assert output.stat().st_size > 0
    assert png_size(output) == (6 * 80, 3 * 80)


def test_default_sizes_and_output_dir(tmp_path):
    run_dir = make_run(tmp_path, "clars")
    output_dir = tmp_path / "plots" / "new"

    status = plot.main([str(run_dir), f"--output_dir={output_dir}"])

    assert status == 0
    assert png_size(output_dir / CURVES) == (1200, 500)
    assert png_size(output_dir / HEATMAP) == (1200, 800)
    assert not (run_dir / CURVES).exists()


def test_main_prints_written_paths(tmp_path, capsys):
    run_dir = make_run(tmp_path, "clars")

    plot.main([str(run_dir), "--dpi=30"])

    output = capsys.readouterr().out
    assert str(run_dir / CURVES) in output
    assert str(run_dir / HEATMAP) in output


# --- Missing and malformed input ----------------------------------------------------


def test_missing_metrics_names_path(tmp_path, capsys):
    run_dir = tmp_path / "empty_run"
    run_dir.mkdir()

    status = plot.main([str(run_dir), "--skip_heatmap"])

    assert status == 1
    assert str(run_dir / plot.METRICS_FILE) in capsys.readouterr().err


def test_load_metrics_missing_raises(tmp_path):
    run_dir = tmp_path / "empty_run"
    run_dir.mkdir()

    with pytest.raises(FileNotFoundError) as raised:
        plot.load_metrics(run_dir)
    assert str(run_dir / plot.METRICS_FILE) in str(raised.value)


def test_missing_run_dir_names_path(tmp_path, capsys):
    run_dir = tmp_path / "no_such_run"

    status = plot.main([str(run_dir)])

    assert status == 1
    assert str(run_dir) in capsys.readouterr().err


def test_missing_diagnostics_writes_nothing(tmp_path, capsys):
    run_dir = make_run(tmp_path, "sgd", diagnostics_steps=())

    status = plot.main([str(run_dir)])

    error = capsys.readouterr().err
    assert status == 1
    assert str(run_dir / plot.DIAGNOSTICS_FILE) in error
    assert "--skip_heatmap" in error
    assert not (run_dir / CURVES).exists()


def test_partial_last_line_skipped(tmp_path, caplog):
    run_dir = tmp_path / "running"
    records = [metrics_record(epoch, with_eval=False) for epoch in (1, 2, 3)]
    write_lines(run_dir / plot.METRICS_FILE, records, tail='{"epoch": 4, "step": 4')

    with caplog.at_level(logging.WARNING, logger=plot.__name__):
        loaded = plot.load_metrics(run_dir)

    assert [record["epoch"] for record in loaded] == [1, 2, 3]
    assert str(run_dir / plot.METRICS_FILE) in caplog.text
    assert "line 4" in caplog.text


def test_partial_run_still_plots(tmp_path):
    run_dir = make_run(tmp_path, "running")
    with open(run_dir / plot.DIAGNOSTICS_FILE, "a", encoding="utf-8") as file:
        file.write('{"step": 30, "trust_ratio": {"conv1/ker')

    status = plot.main([str(run_dir)])

    assert status == 0
    assert png_size(run_dir / HEATMAP) == (1200, 800)


def test_invalid_middle_line_raises(tmp_path):
    path = tmp_path / "run" / plot.METRICS_FILE
    path.parent.mkdir()
    lines = [
        json.dumps(metrics_record(1, False)),
        "{not json",
        json.dumps(metrics_record(3, False)),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    with pytest.raises(ValueError) as raised:
        plot.load_metrics(path.parent)
    assert str(path) in str(raised.value)
    assert "line 2" in str(raised.value)


def test_record_without_epoch_raises(tmp_path):
    path = tmp_path / "run" / plot.METRICS_FILE
    write_lines(path, [metrics_record(1, False), {"step": 20, "loss": 1.0}])

    with pytest.raises(ValueError, match="'epoch'") as raised:
        plot.load_metrics(path.parent)
    assert "line 2" in str(raised.value)


def test_non_numeric_step_raises(tmp_path):
    records = diagnostics_records((0, 10))
    records[1]["step"] = "10"
    write_lines(tmp_path / "run" / plot.DIAGNOSTICS_FILE, records)

    with pytest.raises(ValueError, match="'step'") as raised:
        plot.load_diagnostics(tmp_path / "run")
    assert "line 2" in str(raised.value)


def test_empty_metrics_run_left_out(tmp_path, caplog):
    finished = make_run(tmp_path, "finished")
    empty = tmp_path / "just_started"
    write_lines(empty / plot.METRICS_FILE, [])

    with caplog.at_level(logging.WARNING, logger=plot.__name__):
        status = plot.main([str(finished), str(empty), "--skip_heatmap"])

    assert status == 0
    assert str(empty / plot.METRICS_FILE) in caplog.text
    assert png_size(finished / CURVES) == (1200, 500)


def test_all_runs_empty_is_error(tmp_path, capsys):
    empty = tmp_path / "just_started"
    write_lines(empty / plot.METRICS_FILE, [])

    status = plot.main([str(empty), "--skip_heatmap"])

    assert status == 1
    assert "No run has a finished epoch" in capsys.readouterr().err


def test_labels_count_mismatch_error(tmp_path, capsys):
    first = make_run(tmp_path, "a")
    second = make_run(tmp_path, "b")

    status = plot.main([str(first), str(second), "--labels=only_one"])

    assert status == 1
    assert "--labels" in capsys.readouterr().err


def test_missing_matplotlib_names_install(tmp_path, monkeypatch):
    run = plot.RunCurves("run", [metrics_record(1, False)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "clars_tf.plot")

    # Importing the module must work without matplotlib, but drawing needs it.
    fresh_plot = importlib.import_module("clars_tf.plot")
    with pytest.raises(ImportError, match=r'pip install -e "\.\[plot\]"'):
        fresh_plot.plot_training_curves([run], tmp_path / CURVES)
    assert not (tmp_path / CURVES).exists()


# --- Curves -------------------------------------------------------------------------


def test_curves_lines_per_run(tmp_path):
    with_eval = make_run(tmp_path, "clars", eval_epochs=(2, 4))
    without_eval = make_run(tmp_path, "sgd", eval_epochs=())
    runs = [
        plot.RunCurves("CLARS", plot.load_metrics(with_eval)),
        plot.RunCurves("SGD", plot.load_metrics(without_eval)),
    ]

    figure = plot.draw_training_curves(runs)

    top1_axes, loss_axes = figure.axes
    expected = ["CLARS train", "CLARS eval", "SGD train"]
    assert [line.get_label() for line in top1_axes.get_lines()] == expected
    assert [line.get_label() for line in loss_axes.get_lines()] == expected


def test_curves_values_match_records(tmp_path):
    run_dir = make_run(tmp_path, "clars", epochs=5, eval_epochs=(1, 3, 5))
    records = [metrics_record(epoch, epoch in (1, 3, 5)) for epoch in range(1, 6)]

    figure = plot.draw_training_curves([plot.RunCurves("run", plot.load_metrics(run_dir))])

    top1_axes, loss_axes = figure.axes
    train_top1, eval_top1 = top1_axes.get_lines()
    train_loss, eval_loss = loss_axes.get_lines()
    np.testing.assert_allclose(train_top1.get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(train_top1.get_ydata(), [100 * r["top1"] for r in records])
    np.testing.assert_allclose(eval_top1.get_xdata(), [1, 3, 5])
    evaluated = [records[epoch - 1] for epoch in (1, 3, 5)]
    np.testing.assert_allclose(eval_top1.get_ydata(), [100 * r["eval_top1"] for r in evaluated])
    np.testing.assert_allclose(train_loss.get_ydata(), [r["loss"] for r in records])
    np.testing.assert_allclose(eval_loss.get_ydata(), [r["eval_loss"] for r in evaluated])


def test_repeated_epoch_keeps_last(tmp_path):
    path = tmp_path / "resumed" / plot.METRICS_FILE
    rewritten = dict(metrics_record(2, False), loss=0.5)
    write_lines(path, [metrics_record(1, False), metrics_record(2, False), rewritten,
                       metrics_record(3, False)])

    loaded = plot.load_metrics(path.parent)

    assert [record["epoch"] for record in loaded] == [1, 2, 3]
    assert loaded[1]["loss"] == 0.5


def test_default_labels_are_dir_names(tmp_path):
    first = make_run(tmp_path / "x", "resnet50_32k_clars")
    second = make_run(tmp_path / "y", "resnet50_32k_lars")
    same_name = make_run(tmp_path / "z", "resnet50_32k_clars")

    assert plot._run_labels([first, second], None) == ["resnet50_32k_clars", "resnet50_32k_lars"]
    assert plot._run_labels([first, same_name], None) == [str(first), str(same_name)]


# --- Heatmap ------------------------------------------------------------------------


def test_heatmap_image_matches_ratios():
    steps = (0, 10, 20, 30)
    diagnostics = diagnostics_records(steps)
    # Step 20 lacks one variable, which must be masked.
    del diagnostics[2]["trust_ratio"]["block1_conv/kernel"]

    figure = plot.draw_trust_ratio_heatmap(diagnostics)

    image = figure.axes[0].images[0]
    data = image.get_array()
    expected = np.array(
        [[ratio_value(VARIABLE_PATHS.index(path), step) for step in steps] for path in KERNEL_PATHS]
    )
    assert data.shape == (len(KERNEL_PATHS), len(steps))
    assert bool(data.mask[1, 2])
    np.testing.assert_allclose(data.filled(np.nan)[~data.mask], expected[~data.mask])


def test_heatmap_uses_log_norm():
    diagnostics = diagnostics_records((0, 50, 100))

    figure = plot.draw_trust_ratio_heatmap(diagnostics)

    norm = figure.axes[0].images[0].norm
    rows = [VARIABLE_PATHS.index(path) for path in KERNEL_PATHS]
    values = [ratio_value(row, step) for row in rows for step in (0, 50, 100)]
    assert type(norm).__name__ == "LogNorm"
    assert norm.vmin == pytest.approx(min(values))
    assert norm.vmax == pytest.approx(max(values))


def test_heatmap_constant_ratios_still_plot():
    diagnostics = diagnostics_records((0, 10))
    for record in diagnostics:
        record["trust_ratio"] = {path: 1.0 for path in VARIABLE_PATHS}

    figure = plot.draw_trust_ratio_heatmap(diagnostics)

    norm = figure.axes[0].images[0].norm
    assert norm.vmin < 1.0
    assert norm.vmax > 1.0


def test_heatmap_no_positive_ratio_raises():
    diagnostics = diagnostics_records((0, 10))
    for record in diagnostics:
        record["trust_ratio"] = {path: 0.0 for path in VARIABLE_PATHS}

    with pytest.raises(ValueError, match="no positive trust ratio"):
        plot.draw_trust_ratio_heatmap(diagnostics)


def tiny_keras_model():
    """Return a small model with rank-1 to rank-4 variables of several layer types."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.DepthwiseConv2D(3, name="depthwise")(x)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("model_name", ["tiny", "resnet20"])
def test_heatmap_rows_exclude_rank_one(model_name):
    if model_name == "tiny":
        model = tiny_keras_model()
    else:
        model = build_model("resnet20", num_classes=10, image_size=32)
    variables = model.trainable_variables
    paths = [variable.path for variable in variables]
    diagnostics = diagnostics_records((0, 10), paths=paths)

    selected = plot.select_heatmap_variables(plot.variable_paths_in_order(diagnostics))

    assert selected == [variable.path for variable in variables if len(variable.shape) > 1]


def test_heatmap_pattern_selects_matches():
    diagnostics = diagnostics_records((0, 10))

    figure = plot.draw_trust_ratio_heatmap(diagnostics, variable_pattern=r"^bn1/")

    axes = figure.axes[0]
    assert axes.images[0].get_array().shape == (2, 2)
    assert [label.get_text() for label in axes.get_yticklabels()] == ["bn1/gamma", "bn1/beta"]


def test_heatmap_pattern_no_match_raises():
    diagnostics = diagnostics_records((0, 10))

    with pytest.raises(ValueError, match="no_such_layer"):
        plot.draw_trust_ratio_heatmap(diagnostics, variable_pattern="no_such_layer")


def test_heatmap_invalid_pattern_raises():
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        plot.select_heatmap_variables(VARIABLE_PATHS, "conv[")


def test_heatmap_run_flag_selects_run(tmp_path):
    sgd = make_run(tmp_path, "sgd", diagnostics_steps=())
    clars = make_run(tmp_path, "clars")

    status = plot.main([str(sgd), str(clars), f"--heatmap_run={clars}"])

    assert status == 0
    assert png_size(sgd / HEATMAP) == (1200, 800)


def test_repeated_step_keeps_last(tmp_path):
    records = diagnostics_records((0, 10, 10, 20))
    records[2]["trust_ratio"]["conv1/kernel"] = 0.125
    write_lines(tmp_path / "resumed" / plot.DIAGNOSTICS_FILE, records)

    loaded = plot.load_diagnostics(tmp_path / "resumed")

    assert [record["step"] for record in loaded] == [0, 10, 20]
    assert loaded[1]["trust_ratio"]["conv1/kernel"] == 0.125
