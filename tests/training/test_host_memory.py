"""`training.release_host_memory`: the heap's free pages go back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kwanzaa_adapter.config import load_training_config

# Large blocks (sizes varying like a training step's activations) between small long-lived objects:
# glibc serves them from the heap once its dynamic mmap threshold has risen, and keeps them resident.
SCRIPT = """
import sys
from kwanzaa_adapter.training.host_memory import release_free_heap

def rss_mb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024

warm = [bytearray(4 << 20) for _ in range(2)]
del warm  # freeing an mmapped block raises glibc's dynamic threshold above its size
base = rss_mb()
live, pins = [], []
for i in range(64):
    live.append(bytearray((2 << 20) + 4096 * i))
    pins.append(bytearray(512))
live.clear()
if sys.argv[1] == "release":
    assert release_free_heap()
print(rss_mb() - base)
"""


def retained_mb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_released_heap_returns_the_freed_blocks_the_heap_kept():
    kept, released = retained_mb("keep"), retained_mb("release")
    assert released < 16, released
    assert kept - released > 64, (kept, released)  # 64 blocks of 2 MB+ stayed resident without the release


def test_release_runs_after_every_optimizer_step_and_every_evaluation_batch(tiny_run_config):
    from kwanzaa_adapter.training import trainer
    from kwanzaa_adapter.training.workflow import train_adapter

    calls = []

    def counted() -> bool:
        calls.append(1)
        return trainer.release_free_heap.__wrapped__()

    counted.__wrapped__ = trainer.release_free_heap
    config = tiny_run_config(training={"release_host_memory": True})
    assert load_training_config(config).training.release_host_memory
    original, trainer.release_free_heap = trainer.release_free_heap, counted
    try:
        train_adapter(config)
    finally:
        trainer.release_free_heap = original
    assert len(calls) == 4 + 2 * 2  # 4 optimizer steps; 2 evaluations (eval_steps 2) of 4 rows in batches of 2


def test_release_that_cannot_act_warns_and_is_recorded(tiny_run_config, monkeypatch, caplog):
    """Without glibc's malloc_trim the setting does nothing: the run says so and metadata.json records it."""
    import json
    import logging

    from kwanzaa_adapter.training import trainer
    from kwanzaa_adapter.training.workflow import train_adapter

    monkeypatch.setattr(trainer, "can_release_free_heap", lambda: False)
    with caplog.at_level(logging.WARNING, logger="kwanzaa_adapter.training.trainer"):
        result = train_adapter(tiny_run_config(training={"release_host_memory": True}))
    warned = [r.getMessage() for r in caplog.records if "release_host_memory" in r.getMessage()]
    assert len(warned) == 1 and "malloc_trim" in warned[0]
    notes = json.loads((result.artifact_dir / "metadata.json").read_text())["notes"]
    assert warned == [n for n in notes if "release_host_memory" in n]
