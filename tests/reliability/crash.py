"""Kill a tiny training run (SIGKILL) at chosen moments, resume it, and compare with an uninterrupted run.

Each run is a `python -m kwanzaa_adapter.cli train` subprocess. A kill comes either from the
fault hook (`KWANZAA_ADAPTER_FAULT=<point>:<n>`, see kwanzaa_adapter/training/faults.py) or from a timer
counted from a moment of training (the Trainer's start, a checkpoint's publication), so that it
lands in training rather than in start-up.
After the kill the run directory must show no partial checkpoint or artifact; the run is then
resumed (`train --resume`, or `train` again when no checkpoint had been completed) and its
`adapter_model.safetensors` compared byte for byte with the uninterrupted run's.

Training is deterministic, so equal bytes alone do not show that anything was resumed: a resume
that ignored the checkpoint and trained from step 0 would end the same. What the resumed process
loaded (`training_summary.json`, key "resume") is therefore compared with the checkpoint it
resumed from, read before the resume could rotate it away: its step, optimizer moments and RNG.
Used by tests/reliability/test_crash_resume.py and bench/reliability.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.checkpointing import checkpoint_problems
from kwanzaa_adapter.training.rundir import CHECKPOINT, checkpoints

RUN_TIMEOUT_S = 600
POLL_S = 0.02
WEIGHTS = "adapter_model.safetensors"
SUMMARY = "training_summary.json"
# Written just before the Trainer is built: the training-and-checkpointing window starts here.
TRAINING_STARTS = "metrics_history.jsonl"

# With 12 rows, batches of 2 and accumulation 2, an epoch is 3 optimizer steps; 6 steps are two
# epochs, checkpoints at 2, 4 and 6 (two kept), dropout on so that RNG restoration matters.
KILL_RUN = dict(
    train_rows=12, eval_rows=2,
    adapter={"dropout": 0.1},
    training={"max_steps": 6, "num_epochs": 2, "per_device_batch_size": 2, "gradient_accumulation_steps": 2},
    evaluation={"eval_steps": 2},
    checkpointing={"save_steps": 2, "save_total_limit": 2},
)

# (label, fault point:n) spread over the run; see faults.py for where each point is.
FAULT_POINTS = (
    ("accumulation window, step 1 (no checkpoint yet)", "substep_end:1"),
    ("mid-step 3, gradients not applied", "pre_optimizer_step:3"),
    ("end of epoch 1 (step 3)", "step_end:3"),
    ("accumulation window, step 4", "substep_end:4"),
    ("mid-step 5, gradients not applied", "pre_optimizer_step:5"),
    ("first checkpoint save, model written", "checkpoint_write:1"),
    ("checkpoint-4 save, model written", "checkpoint_write:2"),
    ("checkpoint-6 sealed, not yet renamed", "checkpoint_sealed:3"),
    ("rotating out checkpoint-2", "checkpoint_rotate:1"),
    ("artifact creation, adapter written", "artifact_write:1"),
    ("final verification of the artifact", "artifact_verify:1"),
)


def child_env(cache: Path, fault: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KWANZAA_ADAPTER_CACHE": str(cache)}
    env.pop("KWANZAA_ADAPTER_FAULT", None)
    if fault:
        env["KWANZAA_ADAPTER_FAULT"] = fault
    return env


def train_command(config: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kwanzaa_adapter.cli", "train", "--config", str(config),
            "--output-dir", str(output_dir), *extra]


@dataclass
class Finished:
    code: int | None  # None: still running at the time limit (killed)
    output: str
    seconds: float
    appeared: dict[str, float] = field(default_factory=dict)  # entry of the watched directory -> seconds


def run(command: list[str], env: dict, kill_after: float | None = None, counted_from: Path | None = None,
        watch: Path | None = None, timeout: float = RUN_TIMEOUT_S) -> Finished:
    """Run to the end, or SIGKILL it `kill_after` seconds after `counted_from` exists (after the start
    when None). `watch`: a directory whose entries' first appearance (seconds since the start) is
    recorded. The output is stdout and stderr together."""
    started = time.monotonic()
    clock = None if counted_from is not None else started
    appeared, timed_out = {}, False
    with tempfile.TemporaryFile("w+", errors="replace") as log:
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        while process.poll() is None:
            now = time.monotonic()
            if clock is None and counted_from.exists():
                clock = now
            if watch is not None and watch.is_dir():
                for entry in os.scandir(watch):
                    appeared.setdefault(entry.name, now - started)
            timed_out = now - started > timeout
            if timed_out or (kill_after is not None and clock is not None and now - clock >= kill_after):
                process.send_signal(signal.SIGKILL)
                process.wait()
                break
            time.sleep(POLL_S)
        log.seek(0)
        output = log.read()
    return Finished(None if timed_out else process.returncode, output, time.monotonic() - started, appeared)


def partial_files(run_dir: Path) -> list[str]:
    """Checkpoints or artifacts visible under their final names that are not complete and intact."""
    if not run_dir.is_dir():
        return []
    found = []
    complete = set(checkpoints(run_dir))
    for entry in sorted(run_dir.iterdir()):
        if CHECKPOINT.match(entry.name):
            if entry not in complete:
                found.append(f"{entry.name}: no manifest")
            elif problems := checkpoint_problems(entry):
                found.append(f"{entry.name}: {'; '.join(problems)}")
    artifact = run_dir / "final_artifact"
    if artifact.exists() and not (report := verify_artifact(artifact)).ok:
        found.append(report.format())
    return found


def checkpoint_state(checkpoint: Path) -> dict:
    """What resuming from `checkpoint` must load, as the resumed run records it (training/trainer.py):
    the step, the optimizer moments' digest and the digest of the CPU RNG state."""
    import torch
    from transformers.trainer_pt_utils import safe_globals

    from kwanzaa_adapter.training.trainer import optimizer_moments_digest

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    with safe_globals():  # the RNG file holds numpy's state too
        rng = torch.load(checkpoint / "rng_state.pth", weights_only=True)["cpu"]
    return {"checkpoint": checkpoint.name, "step": state["global_step"], "max_steps": state["max_steps"],
            "optimizer": optimizer_moments_digest(optimizer),
            "rng": {"torch_cpu_sha256": hashlib.sha256(rng.numpy().tobytes()).hexdigest()}}


def resume_problems(expected: dict, record: dict | None) -> list[str]:
    """How what a resumed run recorded (summary["resume"]) differs from the checkpoint's `checkpoint_state`."""
    if record is None:
        return ["the run recorded no resume"]
    remaining = expected["max_steps"] - expected["step"]
    wanted = {"checkpoint": expected["checkpoint"], "started_at_step": expected["step"], "steps_run": remaining,
              "optimizer": expected["optimizer"]}
    if remaining:  # the Trainer restores the RNG when it enters an epoch, and with no step left it enters none
        wanted["rng"] = expected["rng"]
    return [f"{key}: loaded {record.get(key)!r}, the checkpoint holds {value!r}"
            for key, value in wanted.items() if record.get(key) != value]


@dataclass
class Trial:
    label: str
    how: str  # the fault point, or "timer <s> after <run-directory entry>"
    killed: bool = False
    partial_after_kill: list[str] = field(default_factory=list)
    # "checkpoint-N" (resumed from it), "scratch" (no checkpoint yet: trained again), or "published"
    # (killed after the artifact was published: nothing left to do, nothing resumed)
    resumed_from: str = ""
    completed: bool = False  # the second process published the artifact (or it was already published)
    identical: bool = False
    resume_record: dict | None = None  # what the second process recorded as loaded
    resume_problems: list[str] = field(default_factory=list)
    partial_after_resume: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def outcome(self) -> str:
        """"resumed" (a real resume: from a checkpoint, having loaded what it holds, to a published
        artifact), "restarted" (from scratch), "after_publish", or "failed" (not killed, not completed,
        or resumed without loading what the checkpoint holds)."""
        if not (self.killed and self.completed) or self.resume_problems:
            return "failed"
        if self.resumed_from == "published":
            return "after_publish"
        return "restarted" if self.resumed_from == "scratch" else "resumed"

    @property
    def partial_visible(self) -> int:
        return len(self.partial_after_kill) + len(self.partial_after_resume)


def kill_and_resume(label: str, config: Path, output_dir: Path, cache: Path, reference: bytes,
                    fault: str | None = None, timer: tuple[str, float] | None = None) -> Trial:
    """One trial: a run killed by `fault`, or by a `timer` (entry of the run directory, seconds after
    it appears), then resumed and compared."""
    trial = Trial(label, fault or f"timer {timer[1]:.2f}s after {timer[0]}")
    run_dir = output_dir / "tiny"
    kill = {} if timer is None else {"counted_from": run_dir / timer[0], "kill_after": timer[1]}
    first = run(train_command(config, output_dir), child_env(cache, fault), **kill)
    trial.killed = first.code == -signal.SIGKILL
    if not trial.killed:
        trial.note = f"not killed: exit {first.code}; {first.output[-500:]}"
        return trial
    trial.partial_after_kill = partial_files(run_dir)
    if (run_dir / "final_artifact").is_dir() and not trial.partial_after_kill:
        # Killed after the verified artifact was renamed into place: the run's result is complete
        # and `train --resume` rightly refuses (exit 2, nothing to resume).
        trial.resumed_from, trial.completed = "published", True
    else:
        complete = checkpoints(run_dir)
        trial.resumed_from = complete[-1].name if complete else "scratch"
        expected = checkpoint_state(complete[-1]) if complete else None  # before rotation removes it
        again = run(train_command(config, output_dir, *(("--resume",) if complete else ())), child_env(cache))
        trial.completed = again.code == 0
        if not trial.completed:
            trial.note = f"resume exit {again.code}: {again.output[-800:]}"
            return trial
        trial.resume_record = json.loads((run_dir / SUMMARY).read_text())["resume"]
        if expected is not None:
            trial.resume_problems = resume_problems(expected, trial.resume_record)
        elif trial.resume_record is not None:
            trial.resume_problems = [f"a fresh run recorded a resume: {trial.resume_record}"]
    trial.partial_after_resume = partial_files(run_dir)
    trial.identical = (run_dir / "final_artifact" / WEIGHTS).read_bytes() == reference
    return trial


@dataclass
class Reference:
    weights: bytes  # the uninterrupted run's adapter_model.safetensors
    seconds: float
    appeared: dict[str, float]  # entry of its run directory -> seconds after the start it first appeared

    def milestones(self) -> list[tuple[str, float]]:
        """The Trainer's start (TRAINING_STARTS written) and each checkpoint's publication, in seconds
        after the Trainer's start: the training-and-checkpointing window ends at the last one."""
        start = self.appeared[TRAINING_STARTS]
        found = [(name, seconds - start) for name, seconds in self.appeared.items()
                 if name == TRAINING_STARTS or CHECKPOINT.match(name)]
        return sorted(found, key=lambda milestone: milestone[1])

    def moment(self, at: float) -> tuple[str, float]:
        """`at` seconds into training, as (the last milestone before it, seconds after that milestone):
        a kill timed from the nearest milestone lands where meant even when a run is slower or faster."""
        name, seconds = [milestone for milestone in self.milestones() if milestone[1] <= at][-1]
        return name, at - seconds


def reference_run(config: Path, output_dir: Path, cache: Path) -> Reference:
    """The uninterrupted run, watched: its adapter weights, duration, and when each file appeared."""
    done = run(train_command(config, output_dir), child_env(cache), watch=output_dir / "tiny")
    if done.code != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {done.code}):\n{done.output[-3000:]}")
    return Reference((output_dir / "tiny" / "final_artifact" / WEIGHTS).read_bytes(), done.seconds, done.appeared)
