"""train_imagenet.py run as a user runs it: a subprocess with flags, files and exit code."""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "train_imagenet.py"
TIMEOUT_SECONDS = 600


def run_script(*flags, timeout=TIMEOUT_SECONDS, cwd=REPO_ROOT):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # Short runs: without tf.data's tuning thread the script need not wait for
    # it at exit (up to a minute with TensorFlow 2.21).
    return subprocess.run(
        [sys.executable, str(SCRIPT), *flags, "--tf_data_autotune=false"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_clean_usage_error(result, message):
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--model=resnet18"], "value should be one of"),
        (["--global_batch_size=0", "--model_dir=/tmp/unused"], "--global_batch_size must be > 0"),
        (["--dataset=folder", "--data_dir=/no/such/folder", "--model_dir=/tmp/unused"],
         "--data_dir=/no/such/folder does not exist"),
        (["--tpu=my-tpu", "--model_dir=/tmp/unused"], "only used with --strategy=tpu"),
    ],
)
def test_bad_flags_fail_without_traceback(flags, message):
    assert_clean_usage_error(run_script(*flags), message)


def test_batch_not_divisible_by_replicas(tmp_path):
    result = run_script(
        "--strategy=mirrored", "--cpu_replicas=3", "--global_batch_size=16",
        "--model=resnet20", "--image_size=32", f"--model_dir={tmp_path}",
    )
    assert_clean_usage_error(result, "not divisible by the 3 replicas")


def test_unknown_tfds_dataset(tmp_path):
    result = run_script("--dataset=no_such_dataset_xyz", f"--model_dir={tmp_path}")
    assert_clean_usage_error(result, "no_such_dataset_xyz")


def test_imagenet_sample_mirrored_and_resume(imagenet_sample_dir, tmp_path):
    flags = [
        "--dataset=folder", f"--data_dir={imagenet_sample_dir}", "--model=resnet20",
        "--image_size=32", "--global_batch_size=16", "--strategy=mirrored",
        "--cpu_replicas=2", "--optimizer=clars", "--base_learning_rate=0.1",
        "--steps_per_execution=2", "--log_every_steps=2", "--diagnostics_every_steps=2",
        f"--model_dir={tmp_path}", "--seed=1",
    ]
    # XLA is on for the first invocation only: a resumed run may change it.
    first = run_script(*flags, "--train_steps=4", "--jit_compile")
    assert first.returncode == 0, first.stderr[-4000:]
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [4]
    assert (tmp_path / "checkpoints" / "checkpoint").is_file()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas"] == 2
    assert summary["num_classes"] == 1000

    second = run_script(*flags, "--train_steps=8")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Resuming from" in second.stderr
    records = read_jsonl(tmp_path / "metrics.jsonl")
    # The partial first epoch is written again when the resumed run ends it.
    assert [r["step"] for r in records] == [8]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 8
    assert summary["steps_this_invocation"] == 4
    diagnostics = read_jsonl(tmp_path / "diagnostics.jsonl")
    assert [d["step"] for d in diagnostics] == [2, 4, 6, 8]
    ratios = diagnostics[-1]["trust_ratio"]
    assert ratios["stem_conv/kernel"] <= 0.1 + 1e-6  # the clip, stored in float32
    assert ratios["stem_bn/gamma"] == 1.0
    assert_complete_norms_at_least_batch_norms(diagnostics[-1])


def assert_complete_norms_at_least_batch_norms(record):
    """The mean of sample norms bounds the norm of the mean gradient (triangle inequality)."""
    for path, complete in record["complete_norm"].items():
        assert complete >= record["gradient_norm"][path] * (1 - 1e-5), path


def test_per_example_source_on_digits(tmp_path):
    result = run_script(
        "--dataset=digits", "--model=resnet20", "--image_size=32", "--global_batch_size=32",
        "--train_steps=3", "--optimizer=clars", "--complete_norm_source=per_example",
        "--log_every_steps=1", "--diagnostics_every_steps=3", "--eval_steps=1",
        f"--model_dir={tmp_path}", "--seed=0",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "no gradient samples" not in result.stderr
    diagnostics = read_jsonl(tmp_path / "diagnostics.jsonl")
    assert [d["step"] for d in diagnostics] == [3]
    assert_complete_norms_at_least_batch_norms(diagnostics[0])


def test_rerun_of_complete_run_keeps_metrics(tmp_path):
    flags = [
        "--dataset=synthetic", "--model=resnet20", "--image_size=16", "--global_batch_size=8",
        "--train_steps=2", "--eval_steps=1", f"--model_dir={tmp_path}", "--seed=0",
    ]
    first = run_script(*flags)
    assert first.returncode == 0, first.stderr[-4000:]
    trained = json.loads((tmp_path / "summary.json").read_text())["final"]

    again = run_script(*flags)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "already complete" in again.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_this_invocation"] == 0
    assert summary["final"]["loss"] == trained["loss"]
    assert summary["final"]["top1"] == trained["top1"]
    assert "eval_top1" in summary["final"]
    assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 1


def test_cifar10_short_epoch_beats_chance(cifar10_dir, tmp_path):
    result = run_script(
        "--dataset=folder", f"--data_dir={cifar10_dir}", "--model=resnet20",
        "--image_size=32", "--global_batch_size=128", "--train_steps=120",
        "--optimizer=clars", "--complete_norm_source=accumulation",
        "--gradient_accumulation_steps=2", "--base_learning_rate=0.1",
        "--reference_batch_size=128", "--weight_decay=2e-4", "--steps_per_execution=10",
        "--log_every_steps=40", "--diagnostics_every_steps=0", "--eval_steps=20",
        f"--model_dir={tmp_path}", "--seed=0",
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Without a terminal, one progress line per --log_every_steps, not per call.
    assert "Step 40/120" in result.stderr
    assert "Step 10/120" not in result.stderr
    record = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    # Ten classes: chance is 0.1 top-1.
    assert record["eval_top1"] > 0.2
    assert record["loss"] < 2.3


def quickstart_command():
    """Return the first command of the README's quick start, as written there."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", section, re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip() and not line.startswith("#")]
    command = " ".join(line.rstrip("\\").strip() for line in lines)
    return shlex.split(command)


def test_readme_quickstart_runs(tmp_path):
    """The README's first command, word for word, from a fresh working folder.

    The folder links the script and configs/ of this checkout, so the relative
    --model_dir of the README lands in the temporary folder.
    """
    command = quickstart_command()
    assert command[:2] == ["python", "train_imagenet.py"]
    model_dir = next(c for c in command if c.startswith("--model_dir=")).split("=", 1)[1]
    assert not os.path.isabs(model_dir), "the README's --model_dir should be relative"
    (tmp_path / "train_imagenet.py").symlink_to(SCRIPT)
    (tmp_path / "configs").symlink_to(REPO_ROOT / "configs", target_is_directory=True)
    result = subprocess.run(
        [sys.executable, *command[1:]],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
        cwd=tmp_path,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = read_jsonl(tmp_path / model_dir / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["eval_top1"] > 0.5
