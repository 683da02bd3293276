"""RunLog: progress output, metrics records and what a resumed run rewrites."""

import logging

from clars_tf.training.run_logs import RunLog


def test_progress_logs_only_marked_steps(tmp_path, caplog):
    run_log = RunLog(str(tmp_path), is_chief=True, steps_per_epoch=4, total_steps=4)
    run_log.start_epoch(1, 1, 0)
    caplog.set_level(logging.INFO, logger="clars_tf.training.run_logs")

    for step in range(1, 5):
        run_log.progress(step, step, {"loss": 1.0 / step}, log_line=step % 2 == 0)

    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Step")]
    assert lines == ["Step 2/4: loss 0.5", "Step 4/4: loss 0.25"]


def test_last_epoch_record_skips_cut_line(tmp_path):
    run_log = RunLog(str(tmp_path), is_chief=True, steps_per_epoch=4, total_steps=8)
    assert run_log.last_epoch_record() == {}

    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "loss": 2.0}\n{"epoch": 2, "lo')

    assert run_log.last_epoch_record() == {"epoch": 1, "loss": 2.0}


def test_forget_from_drops_rewritten_records(tmp_path):
    run_log = RunLog(str(tmp_path), is_chief=True, steps_per_epoch=4, total_steps=12)
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "step": 4}\n{"epoch": 2, "step": 8}\n{"epoch": 3, "st'
    )
    (tmp_path / "diagnostics.jsonl").write_text(
        '{"step": 2}\n{"step": 4}\n{"step": 6}\n{"step": 8}\n'
    )

    run_log.forget_from(6)  # Resumed inside epoch 2.

    assert (tmp_path / "metrics.jsonl").read_text() == '{"epoch": 1, "step": 4}\n'
    assert (tmp_path / "diagnostics.jsonl").read_text() == '{"step": 2}\n{"step": 4}\n{"step": 6}\n'


def test_progress_bar_on_resumed_epoch(tmp_path):
    run_log = RunLog(str(tmp_path), is_chief=True, steps_per_epoch=4, total_steps=12)
    run_log._interactive = True  # As on a terminal.
    run_log.start_epoch(2, 3, 5)  # Resumed one step into epoch 2, 3 steps to go.

    run_log.progress(1, 6, {"loss": 3.0, "lr": 0.1}, log_line=False)
    run_log.progress(2, 7, {"loss": 1.0, "lr": 0.1}, log_line=False)

    bar = run_log._progress
    assert bar.target == 3
    # The loop passes running means, which the bar must show unchanged. Before
    # the last step, Progbar displays the weighted total divided by the weight.
    total, weight = bar._values["loss"]
    assert total / weight == 1.0
