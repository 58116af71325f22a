"""Crash and resume: a run killed with SIGKILL resumes to the uninterrupted run's adapter bytes,
having loaded the checkpoint's step, optimizer moments and RNG state; checkpoints are complete or
ignored; resume refuses another run's checkpoint; a full disk during the artifact write and a
second process on the same run directory fail cleanly.

Training is deterministic: equal bytes would also come from a "resume" that trained from step 0,
so what the resumed process loaded (training_summary.json, "resume") is checked against the
checkpoint. The kills here are a subset of bench/reliability.py's (four moments of eleven, no timers).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import write_run_config
from helpers import CrashAfter
from kwanzaa_adapter import cli
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.checkpointing import IDENTITY_FILE, checkpoint_problems
from kwanzaa_adapter.training.rundir import checkpoints
from kwanzaa_adapter.training.workflow import train_adapter

from .corpus import snapshot
from .crash import (
    KILL_RUN,
    SUMMARY,
    WEIGHTS,
    checkpoint_state,
    child_env,
    kill_and_resume,
    partial_files,
    reference_run,
    train_command,
)

# moment -> (fault point, the checkpoint the resume must start from)
KILL_POINTS = {
    "mid-step, gradients not applied": ("pre_optimizer_step:3", "checkpoint-2"),
    "inside the accumulation window": ("substep_end:4", "checkpoint-2"),
    "during a checkpoint save": ("checkpoint_sealed:2", "checkpoint-2"),
    "during the final verification": ("artifact_verify:1", "checkpoint-6"),
}


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, tiny_model_dir):
    """(config, tokenization cache, uninterrupted adapter bytes) for the killed runs."""
    root = tmp_path_factory.mktemp("kill")
    config = write_run_config(root, tiny_model_dir, **KILL_RUN)
    reference = reference_run(config, root / "reference", root / "cache")
    return root, config, reference.weights


@pytest.mark.parametrize("moment", list(KILL_POINTS))
def test_run_killed_at_any_moment_resumes_from_its_checkpoint_to_identical_adapter_bytes(kill_setup, moment):
    root, config, reference = kill_setup
    fault, checkpoint = KILL_POINTS[moment]
    out = root / moment.replace(" ", "-").replace(",", "")
    trial = kill_and_resume(moment, config, out, root / "cache", reference, fault=fault)
    assert trial.killed, trial.note
    assert trial.partial_after_kill == [] and trial.partial_after_resume == []
    assert trial.resumed_from == checkpoint and trial.completed, trial.note
    assert trial.resume_problems == []  # its step, optimizer moments and RNG state were loaded
    assert trial.identical
    assert not [p.name for p in (out / "tiny").iterdir() if p.name.startswith(".tmp-")]


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, tiny_model_dir):
    """(config, run directory) of a run that stopped after checkpoint-2 of 4."""
    root = tmp_path_factory.mktemp("crashed")
    config = write_run_config(root, tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config, callbacks=(CrashAfter(2),))
    return config, root / "outputs" / "tiny"


def test_checkpoints_are_sealed_with_the_runs_identity(crashed):
    _, run_dir = crashed
    (run_dir / "checkpoint-8").mkdir()  # unsealed: not a checkpoint
    try:
        assert checkpoints(run_dir) == [run_dir / "checkpoint-2"]
    finally:
        (run_dir / "checkpoint-8").rmdir()
    sealed = run_dir / "checkpoint-2"
    listed = set(json.loads((sealed / "checksums.json").read_text())["files"])
    assert {IDENTITY_FILE, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= listed
    identity = json.loads((sealed / IDENTITY_FILE).read_text())
    assert set(identity) == {"config_sha256", "datasets", "base_model_digest"}
    assert set(identity["datasets"]) == {"train", "eval"}
    assert checkpoint_problems(sealed) == []


def test_resume_refuses_a_changed_config_naming_it(crashed, capsys):
    config, _ = crashed
    assert cli.main(["train", "--config", str(config), "--resume", "--set", "training.learning_rate=0.02"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "resolved config" in err and "Traceback" not in err


def test_resume_refuses_changed_training_data_naming_it(crashed, capsys):
    config, _ = crashed
    train = config.parent / "train.jsonl"
    original = train.read_bytes()
    lines = original.decode().splitlines()
    train.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # same rows, another order
    try:
        assert cli.main(["train", "--config", str(config), "--resume"]) == 2
    finally:
        train.write_bytes(original)
    err = capsys.readouterr().err
    assert "train dataset" in err and "resolved config" not in err


def test_resume_refuses_a_corrupted_checkpoint_naming_the_file(crashed, capsys):
    config, run_dir = crashed
    weights = run_dir / "checkpoint-2" / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    try:
        assert cli.main(["train", "--config", str(config), "--resume"]) == 2
    finally:
        weights.write_bytes(original)
    err = capsys.readouterr().err
    assert "checkpoint-2" in err and "changed adapter_model.safetensors" in err


@pytest.fixture(scope="module")
def resumed(crashed):
    """The crashed run, with what a killed process leaves behind, resumed to its artifact;
    and what its checkpoint-2 held before the resume (see crash.checkpoint_state)."""
    config, run_dir = crashed
    (run_dir / ".tmp-checkpoint-4").mkdir()
    (run_dir / ".tmp-checkpoint-4" / "adapter_model.safetensors").write_bytes(b"half")
    (run_dir / ".tmp-final_artifact-x1y2").mkdir()
    held = checkpoint_state(run_dir / "checkpoint-2")
    assert cli.main(["train", "--config", str(config), "--resume"]) == 0
    return config, run_dir, held


def loaded_on_resume(run_dir: Path) -> dict | None:
    """What the resumed process recorded as loaded from its checkpoint (None: it did not resume)."""
    return json.loads((run_dir / SUMMARY).read_text())["resume"]


def test_resume_starts_at_the_checkpoints_step_and_runs_only_the_remaining_steps(resumed):
    _, run_dir, held = resumed
    loaded = loaded_on_resume(run_dir)
    assert held["step"] == 2 and held["max_steps"] == 4
    assert loaded["checkpoint"] == "checkpoint-2"
    assert loaded["started_at_step"] == 2 and loaded["steps_run"] == 2


def test_resume_loads_the_checkpoints_optimizer_moments(resumed):
    _, run_dir, held = resumed
    loaded = loaded_on_resume(run_dir)
    assert held["optimizer"]["parameters"] > 0 and held["optimizer"]["steps"] == [2.0]
    assert loaded.get("optimizer") == held["optimizer"]


def test_resume_loads_the_checkpoints_rng_state(resumed):
    _, run_dir, held = resumed
    assert loaded_on_resume(run_dir).get("rng") == held["rng"]


def test_resumed_adapter_is_trained_past_its_checkpoint_and_its_initialisation(resumed):
    _, run_dir, _ = resumed
    final = load_file(run_dir / "final_artifact" / WEIGHTS)
    at_checkpoint = load_file(run_dir / "checkpoint-2" / WEIGHTS)
    lora_b = [name for name in final if "lora_B" in name]
    assert lora_b and [name for name in lora_b if not final[name].any()] == []  # LoRA B starts at zeros
    assert set(final) == set(at_checkpoint)
    assert [name for name in final if final[name].equal(at_checkpoint[name])] == []  # steps 3 and 4 moved them all


def test_resume_removes_what_a_killed_run_left_and_publishes(resumed):
    _, run_dir, _ = resumed
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    assert [p.name for p in checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert partial_files(run_dir) == [] and verify_artifact(run_dir / "final_artifact").ok


def test_full_disk_during_the_artifact_write_fails_cleanly_and_keeps_the_published_one(resumed, monkeypatch,
                                                                                         capsys):
    config, run_dir, _ = resumed
    published = snapshot(run_dir / "final_artifact")
    from kwanzaa_adapter.training import publishing

    def full_disk(directory):
        (Path(directory) / "checksums.json").write_bytes(b'{"algorithm": "sha')  # what fitted
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(directory) / "checksums.json"))

    monkeypatch.setattr(publishing, "seal_artifact", full_disk)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(config)]) == 2  # a new version, beside the published one
    err = capsys.readouterr().err
    messages = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(messages) == 1 and "No space left on device" in messages[0]
    assert "Traceback" not in err
    assert snapshot(run_dir / "final_artifact") == published and verify_artifact(run_dir / "final_artifact").ok
    second = run_dir.parent / "tiny-v0.1.1"
    assert not (second / "final_artifact").exists()
    assert not [p.name for p in second.iterdir() if p.name.startswith(".tmp-")]


def test_a_second_train_process_on_the_same_run_directory_is_refused(kill_setup):
    root, config, _ = kill_setup
    out = root / "locked"
    first = subprocess.Popen(train_command(config, out), env=child_env(root / "cache"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "tiny" / "baseline_checksums.json").exists():  # written with the lock held
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        first.send_signal(signal.SIGSTOP)  # hold it there, lock and all
        second = subprocess.run(train_command(config, out), env=child_env(root / "cache"), capture_output=True,
                                text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    assert "another train process is using this run directory" in second.stderr
    assert "Traceback" not in second.stderr
    shutil.rmtree(out)
