"""Training metrics: perplexity, the flushed history and its summary, resume over a truncated tail."""

from __future__ import annotations

import json
import math

import pytest

from kwanzaa_adapter.evaluation.metrics import (
    HISTORY_FILE,
    SUMMARY_FILE,
    MetricsTracker,
    TrainingMetrics,
    compute_perplexity,
    load_history,
    log_training_progress,
)


def test_perplexity_is_exp_of_loss_and_overflow_safe():
    assert compute_perplexity(0.0) == 1.0
    assert compute_perplexity(2.0) == math.exp(2.0)
    assert compute_perplexity(1e6) == float("inf")
    assert compute_perplexity(None) is None


def test_tracker_writes_one_flushed_line_per_log_step(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 10, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.5})
    assert len((tmp_path / HISTORY_FILE).read_text().splitlines()) == 1
    tracker.log_metrics(TrainingMetrics(step=20, loss=1.5, tokens_per_second=100.0))
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert [m.step for m in tracker.history] == [10, 20]


def test_tracker_fills_perplexity_from_eval_loss_and_ignores_unknown_keys(tmp_path):
    logged = MetricsTracker(tmp_path).log_metrics({"step": 5, "eval_loss": 1.0, "eval_runtime": 3.2})
    assert logged == TrainingMetrics(step=5, eval_loss=1.0, perplexity=math.e)


def test_metrics_without_step_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="'step'"):
        MetricsTracker(tmp_path).log_metrics({"loss": 1.0})


def test_summary_reports_final_and_best_values(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 10, "loss": 2.0, "tokens_per_second": 100.0, "wall_time": 5.0})
    tracker.log_metrics({"step": 10, "eval_loss": 1.8})
    tracker.log_metrics({"step": 20, "loss": 1.2, "tokens_per_second": 300.0, "wall_time": 9.0})
    tracker.log_metrics({"step": 20, "eval_loss": 1.9})
    tracker.log_metrics({"step": 30, "loss": 1.4})
    assert tracker.summary() == {
        "steps": 30,
        "log_entries": 5,
        "final_loss": 1.4,
        "best_loss": 1.2,
        "final_eval_loss": 1.9,
        "best_eval_loss": 1.8,
        "best_eval_step": 10,
        "final_perplexity": math.exp(1.9),
        "mean_tokens_per_second": 200.0,
        "wall_time": 9.0,
    }
    path = tracker.save_summary()
    assert path == tmp_path / SUMMARY_FILE
    assert json.loads(path.read_text()) == tracker.summary()


def test_summary_of_empty_history_has_no_values(tmp_path):
    summary = MetricsTracker(tmp_path).summary()
    assert summary["steps"] == 0 and summary["log_entries"] == 0
    assert {k for k, v in summary.items() if v is not None} == {"steps", "log_entries"}


def test_history_round_trips_and_tolerates_truncated_last_line(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 1, "loss": 3.0})
    tracker.log_metrics({"step": 2, "loss": 2.5, "eval_loss": 2.4})
    history_path = tmp_path / HISTORY_FILE
    assert load_history(history_path) == tracker.history
    with history_path.open("a") as handle:
        handle.write('{"step": 3, "loss": 2.')  # a crash mid-write
    assert load_history(history_path) == tracker.history


def test_truncated_line_before_the_end_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / HISTORY_FILE
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=f"{HISTORY_FILE}:2:"):
        load_history(path)


def test_resumed_tracker_drops_truncated_tail_and_keeps_appending(tmp_path):
    first = MetricsTracker(tmp_path)
    first.log_metrics({"step": 1, "loss": 3.0})
    with (tmp_path / HISTORY_FILE).open("a") as handle:
        handle.write('{"step": 2, "lo')
    resumed = MetricsTracker(tmp_path, resume=True)
    resumed.log_metrics({"step": 2, "loss": 2.0})
    assert [m.step for m in load_history(tmp_path / HISTORY_FILE)] == [1, 2]
    assert [m.step for m in resumed.history] == [1, 2]


def test_new_tracker_starts_an_empty_history(tmp_path):
    MetricsTracker(tmp_path).log_metrics({"step": 1, "loss": 3.0})
    MetricsTracker(tmp_path)
    assert (tmp_path / HISTORY_FILE).read_text() == ""


def test_progress_line_shows_reported_fields_only():
    line = log_training_progress(TrainingMetrics(step=7, loss=1.23456, learning_rate=2e-4))
    assert line == "step 7: loss=1.235, learning_rate=0.0002"
