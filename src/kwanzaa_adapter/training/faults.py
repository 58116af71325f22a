"""Test-only fault injection: kill this process with SIGKILL at a named point of a run.

Inert unless `KWANZAA_ADAPTER_FAULT=<point>:<n>` is set: the process then kills itself the n-th
time it reaches `<point>` (n defaults to 1). Used by tests/reliability/test_crash_resume.py and
bench/reliability.py to stop a run at exact moments; `FaultInjection` reaches the Trainer's own
moments through its callbacks.

Points: `substep_end` (a micro-batch done inside the gradient-accumulation window),
`pre_optimizer_step` (gradients accumulated, not yet applied), `step_end`, `checkpoint_write`
(model saved into the staging checkpoint, optimizer not yet), `checkpoint_sealed` (manifest
written, not yet renamed), `checkpoint_rotate` (before an old checkpoint is removed),
`artifact_write` (adapter written into the staging artifact), `artifact_verify` (during the
verification of the sealed staging artifact, before it is published).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

from transformers import TrainerCallback

FAULT_ENV = "KWANZAA_ADAPTER_FAULT"
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fault_injection_enabled() -> bool:
    return bool(os.environ.get(FAULT_ENV))


class FaultInjection(TrainerCallback):
    """The Trainer's moments as fault points (added only when the environment variable is set)."""

    def on_substep_end(self, args, state, control, **kwargs):
        fault_point("substep_end")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        fault_point("pre_optimizer_step")

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("step_end")
