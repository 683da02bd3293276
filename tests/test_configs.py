"""Tests for the flagfiles in configs/: format, experiment grid, arms and reference values.

The expected values are the defaults of the CLARS authors' PyTorch code (GitHub
slowbull/largebatch: main_imagenet_lars.py, main_cifar_lars.py,
lars_optimizer.py), written out here by hand, not read from the configs.

Most tests expand the flagfiles with absl's own include handling and need no
flag definitions. The tests in the last section parse every flagfile against
the real flags of train_imagenet.py and validate the resulting TrainConfig. They
skip when train_imagenet.py does not exist.
"""

import copy
import dataclasses
import importlib.util
import itertools
import re
import sys

import pytest
from absl import flags

from conftest import REPO_ROOT

CONFIGS_DIR = REPO_ROOT / "configs"
SCRIPT = REPO_ROOT / "train_imagenet.py"

ARMS = ("clars", "lars", "sgd")
# Flags in which the three arms of one experiment may differ.
ARM_FLAGS = {"optimizer", "warmup_epochs", "trust_coefficient", "max_trust_ratio",
             "complete_norm_source"}

# A run file is MODEL_BATCHk_ARM.cfg, such as resnet50_32k_clars.cfg.
RUN_FILE_NAME = re.compile(
    r"^(?P<model>[a-z0-9_]+)_(?P<batch_k>\d+)k_(?P<arm>clars|lars|sgd)\.cfg$"
)
# --name=value, or a bare --name (--noname) for a boolean flag.
FLAG_LINE = re.compile(r"^--[a-z][a-z0-9_]*(=\S.*)?$")

IMAGENET_MODELS = ("resnet50", "densenet121", "mobilenet_v1")
IMAGENET_BATCHES = (8192, 16384, 32768)
CIFAR_MODELS = {"resnet20", "resnet56"}

# Defaults of main_imagenet_lars.py and lars_optimizer.py.
IMAGENET_REFERENCE = {
    "dataset": "imagenet2012",
    "image_size": 224,
    "base_learning_rate": 0.128,
    "reference_batch_size": 256,
    "momentum": 0.9,
    "nesterov": False,
    "classic_momentum": "false",
    "weight_decay": 2e-4,
    "epsilon": 1e-6,
    "lr_schedule": "poly",
    "poly_power": 2.0,
    "end_learning_rate": 1e-4,
    "epochs": 90,
    "label_smoothing": 0.0,
}
# Defaults of main_cifar_lars.py.
CIFAR_REFERENCE = dict(
    IMAGENET_REFERENCE,
    dataset="cifar10",
    image_size=32,
    base_learning_rate=0.1,
    reference_batch_size=128,
    epochs=300,
)
# Arm settings. LARS and SGD warm up for 5 epochs (--warmup), and CLARS does not.
# LARS uses eta 0.001 without a clip, and CLARS lw_eta 0.01 clipped at 0.1.
ARM_REFERENCE = {
    "clars": {"optimizer": "clars", "warmup_epochs": 0.0, "trust_coefficient": 0.01,
              "max_trust_ratio": "0.1"},
    "lars": {"optimizer": "lars", "warmup_epochs": 5.0, "trust_coefficient": 0.001,
             "max_trust_ratio": "none"},
    "sgd": {"optimizer": "sgd", "warmup_epochs": 5.0},
}
# String flags whose values look like booleans or numbers.
TEXT_FLAGS = {"classic_momentum", "max_trust_ratio"}
# The reference decays every parameter and keeps ratio 1 for "bn" and "bias"
# parameters, which are the defaults of these two flags.
UNSET_FLAGS = ("exclude_from_weight_decay", "exclude_from_layer_adaptation")


def all_flagfiles():
    return sorted(CONFIGS_DIR.rglob("*.cfg"))


def run_flagfiles(dataset_folder=None):
    """Return the run files (model_batch_arm.cfg), optionally of one dataset folder."""
    files = [path for path in all_flagfiles() if RUN_FILE_NAME.match(path.name)]
    if dataset_folder is not None:
        files = [path for path in files if path.parent.name == dataset_folder]
    return files


def relative(path):
    return path.relative_to(REPO_ROOT).as_posix()


@pytest.fixture
def in_repo_root(monkeypatch):
    """Run the test in the repository root, because nested --flagfile paths are relative to it."""
    monkeypatch.chdir(REPO_ROOT)


def expand_flagfile(path):
    """Expand a flagfile and its includes with absl into {flag name: text value}.

    Later lines win, as they do when absl parses flags.
    """
    arguments = flags.FlagValues().read_flags_from_files([f"--flagfile={relative(path)}"])
    values = {}
    for argument in arguments:
        name, _, value = argument[2:].partition("=")
        values[name] = value
    return values


def typed(value):
    """Convert a flagfile text value to bool, int or float where it is one."""
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for convert in (int, float):
        try:
            return convert(value)
        except ValueError:
            pass
    return value


def experiments():
    """Group run files by (dataset folder, model, batch): {key: {arm: path}}."""
    grouped = {}
    for path in run_flagfiles():
        match = RUN_FILE_NAME.match(path.name)
        key = (path.parent.name, match["model"], int(match["batch_k"]) * 1024)
        grouped.setdefault(key, {})[match["arm"]] = path
    return grouped


# --- Format and grid --------------------------------------------------------------------


@pytest.mark.parametrize("path", all_flagfiles(), ids=relative)
def test_flagfile_lines_are_flags_or_comments(path):
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        # absl keeps everything after "=" in the value, so a trailing comment
        # would become part of it.
        assert FLAG_LINE.match(line), f"{relative(path)}:{number}: not a flag: {line!r}"
        assert "#" not in line, f"{relative(path)}:{number}: comment after a flag: {line!r}"
        assert line == line.rstrip(), f"{relative(path)}:{number}: trailing whitespace"


@pytest.mark.parametrize("path", all_flagfiles(), ids=relative)
def test_flagfile_includes_exist(path):
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("--flagfile="):
            included = REPO_ROOT / line.removeprefix("--flagfile=")
            assert included.is_file(), f"{relative(path)} includes missing {included}"
            assert CONFIGS_DIR in included.parents, f"{relative(path)} includes {included}"


@pytest.mark.parametrize("path", all_flagfiles(), ids=relative)
def test_flagfile_starts_with_comment(path):
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ")


def test_imagenet_grid_is_complete():
    expected = {
        (model, batch, arm)
        for model, batch, arm in itertools.product(IMAGENET_MODELS, IMAGENET_BATCHES, ARMS)
    }
    found = {
        (model, batch, arm)
        for (folder, model, batch), arms in experiments().items() if folder == "imagenet"
        for arm in arms
    }
    assert found == expected


def test_cifar_experiments_have_three_arms():
    cifar = {key: arms for key, arms in experiments().items() if key[0] == "cifar10"}
    assert cifar, "no CIFAR-10 run files in configs/cifar10"
    for (_, model, batch), arms in cifar.items():
        assert model in CIFAR_MODELS
        assert set(arms) == set(ARMS), f"cifar10 {model} {batch}: arms {sorted(arms)}"


# --- Expanded values --------------------------------------------------------------------


@pytest.mark.parametrize("path", run_flagfiles(), ids=relative)
def test_file_name_matches_flags(path, in_repo_root):
    match = RUN_FILE_NAME.match(path.name)
    values = expand_flagfile(path)

    assert values["model"] == match["model"]
    assert int(values["global_batch_size"]) == int(match["batch_k"]) * 1024
    assert values["optimizer"] == match["arm"]


@pytest.mark.parametrize(
    "key", sorted(experiments()), ids=lambda key: f"{key[0]}-{key[1]}-{key[2]}"
)
def test_arms_differ_only_in_arm_flags(key, in_repo_root):
    arms = experiments()[key]
    expanded = {arm: expand_flagfile(path) for arm, path in arms.items()}

    shared = {
        arm: {name: value for name, value in values.items() if name not in ARM_FLAGS}
        for arm, values in expanded.items()
    }
    assert shared["lars"] == shared["clars"]
    assert shared["sgd"] == shared["clars"]


@pytest.mark.parametrize("path", run_flagfiles(), ids=relative)
def test_reference_values_match(path, in_repo_root):
    reference = IMAGENET_REFERENCE if path.parent.name == "imagenet" else CIFAR_REFERENCE
    arm = RUN_FILE_NAME.match(path.name)["arm"]
    expected = dict(reference, **ARM_REFERENCE[arm])
    values = expand_flagfile(path)

    for name, expected_value in expected.items():
        assert name in values, f"{relative(path)} does not set --{name}"
        actual = values[name] if name in TEXT_FLAGS else typed(values[name])
        if isinstance(expected_value, float):
            assert actual == pytest.approx(expected_value), f"--{name} in {relative(path)}"
        else:
            assert actual == expected_value, f"--{name} in {relative(path)}"
    for name in UNSET_FLAGS:
        assert name not in values, f"{relative(path)} sets --{name}"


@pytest.mark.parametrize("path", run_flagfiles(), ids=relative)
def test_peak_learning_rate_scales_linearly(path, in_repo_root):
    values = expand_flagfile(path)
    batch = int(values["global_batch_size"])
    # The reference's peak: lr * batch_size * steps / 256 (ImageNet) or / 128 (CIFAR).
    if path.parent.name == "imagenet":
        reference_peak = 0.128 * batch / 256
    else:
        reference_peak = 0.1 * batch / 128

    peak = float(values["base_learning_rate"]) * batch / int(values["reference_batch_size"])

    assert peak == pytest.approx(reference_peak)


# --- Parsing with the script's flags ----------------------------------------------------


def load_script():
    """Import train_imagenet.py as a module, or skip when it does not exist."""
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} does not exist yet, so the flagfiles cannot be parsed.")
    if "train_imagenet" in sys.modules:
        return sys.modules["train_imagenet"]
    spec = importlib.util.spec_from_file_location("train_imagenet", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_imagenet"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def script_flags(in_repo_root, tmp_path, monkeypatch):
    """Return a function that parses a flagfile into a copy of the script's flags.

    The copy also replaces train_imagenet.FLAGS, so config_from_flags reads it.
    The global absl FLAGS stay untouched.
    """
    script = load_script()

    def parse(path):
        flag_values = copy.deepcopy(script.FLAGS)
        # Reset to the defaults, because another test may have parsed the global flags.
        flag_values.unparse_flags()
        flag_values(["train_imagenet.py", f"--flagfile={relative(path)}",
                     f"--model_dir={tmp_path / 'run'}"])
        monkeypatch.setattr(script, "FLAGS", flag_values)
        return script, flag_values

    return parse


@pytest.mark.parametrize("path", all_flagfiles(), ids=relative)
def test_flagfile_parses_with_script(path, script_flags):
    _, flag_values = script_flags(path)

    for name, value in expand_flagfile(path).items():
        assert flag_values[name].present, f"--{name} from {relative(path)} was not parsed"


@pytest.mark.parametrize("path", run_flagfiles(), ids=relative)
def test_parsed_values_match_reference(path, script_flags):
    _, flag_values = script_flags(path)
    reference = IMAGENET_REFERENCE if path.parent.name == "imagenet" else CIFAR_REFERENCE
    arm = RUN_FILE_NAME.match(path.name)["arm"]

    for name, expected_value in dict(reference, **ARM_REFERENCE[arm]).items():
        actual = flag_values[name].value
        if isinstance(expected_value, float):
            assert actual == pytest.approx(expected_value), f"--{name} in {relative(path)}"
        else:
            assert actual == expected_value, f"--{name} in {relative(path)}"
    for name in UNSET_FLAGS:
        assert flag_values[name].value is None, f"--{name} in {relative(path)}"


@pytest.mark.parametrize(
    "key", sorted(experiments()), ids=lambda key: f"{key[0]}-{key[1]}-{key[2]}"
)
def test_parsed_arms_differ_only_in_arm_flags(key, script_flags):
    parsed = {}
    for arm, path in experiments()[key].items():
        _, flag_values = script_flags(path)
        parsed[arm] = {
            name: value for name, value in flag_values.flag_values_dict().items()
            if name not in ARM_FLAGS and name != "flagfile"
        }

    assert parsed["lars"] == parsed["clars"]
    assert parsed["sgd"] == parsed["clars"]


@pytest.mark.parametrize("path", run_flagfiles(), ids=relative)
def test_run_config_validates(path, script_flags):
    script, _ = script_flags(path)
    config = script.config_from_flags()

    config.validate()

    assert dataclasses.asdict(config)["optimizer"] == RUN_FILE_NAME.match(path.name)["arm"]
