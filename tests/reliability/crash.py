"""Kill a tiny training run (SIGKILL) at chosen moments, resume it, and compare with an uninterrupted run.

Each run is a `python -m kwanzaa_adapter.cli train` subprocess. A kill comes either from the
fault hook (`KWANZAA_ADAPTER_FAULT=<point>:<n>`, see kwanzaa_adapter/faults.py) or from a timer.
After the kill the run directory must show no partial checkpoint or artifact; the run is then
resumed (`train --resume`, or `train` again when no checkpoint had been completed) and its
`adapter_model.safetensors` compared byte for byte with the uninterrupted run's.
Used by tests/reliability/test_crash_resume.py and bench/reliability.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kwanzaa_adapter.artifacts import verify_artifact
from kwanzaa_adapter.checkpointing import checkpoint_problems
from kwanzaa_adapter.rundir import CHECKPOINT, checkpoints

RUN_TIMEOUT_S = 600
WEIGHTS = "adapter_model.safetensors"

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


def run(command: list[str], env: dict, kill_after: float | None = None, timeout: float = RUN_TIMEOUT_S) -> Finished:
    """Run to the end, or SIGKILL it after `kill_after` seconds; the output is stdout and stderr together."""
    started = time.monotonic()
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        output, _ = process.communicate()
        if kill_after is None:
            return Finished(None, output, time.monotonic() - started)
    return Finished(process.returncode, output, time.monotonic() - started)


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


@dataclass
class Trial:
    label: str
    how: str  # the fault point, or "timer <s>"
    killed: bool = False
    partial_after_kill: list[str] = field(default_factory=list)
    resumed_from: str = ""  # "checkpoint-N" or "scratch"
    resumed: bool = False
    identical: bool = False
    partial_after_resume: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def partial_visible(self) -> int:
        return len(self.partial_after_kill) + len(self.partial_after_resume)


def kill_and_resume(label: str, config: Path, output_dir: Path, cache: Path, reference: bytes,
                    fault: str | None = None, kill_after: float | None = None) -> Trial:
    """One trial: a run killed by `fault` or after `kill_after` seconds, then resumed and compared."""
    trial = Trial(label, fault or f"timer {kill_after:.1f}s")
    run_dir = output_dir / "tiny"
    first = run(train_command(config, output_dir), child_env(cache, fault), kill_after=kill_after)
    trial.killed = first.code == -signal.SIGKILL
    if not trial.killed:
        trial.note = f"not killed: exit {first.code}; {first.output[-500:]}"
        return trial
    trial.partial_after_kill = partial_files(run_dir)
    if (run_dir / "final_artifact").is_dir() and not trial.partial_after_kill:
        # Killed after the verified artifact was renamed into place: the run's result is complete
        # and `train --resume` rightly refuses (exit 2, nothing to resume).
        trial.resumed_from, trial.resumed = "published", True
    else:
        complete = checkpoints(run_dir)
        trial.resumed_from = complete[-1].name if complete else "scratch"
        again = run(train_command(config, output_dir, *(("--resume",) if complete else ())), child_env(cache))
        trial.resumed = again.code == 0
        if not trial.resumed:
            trial.note = f"resume exit {again.code}: {again.output[-800:]}"
            return trial
    trial.partial_after_resume = partial_files(run_dir)
    trial.identical = (run_dir / "final_artifact" / WEIGHTS).read_bytes() == reference
    return trial


def reference_run(config: Path, output_dir: Path, cache: Path) -> tuple[bytes, float]:
    """The uninterrupted run: its adapter weights and how long it took."""
    done = run(train_command(config, output_dir), child_env(cache))
    if done.code != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit {done.code}):\n{done.output[-3000:]}")
    return (output_dir / "tiny" / "final_artifact" / WEIGHTS).read_bytes(), done.seconds
