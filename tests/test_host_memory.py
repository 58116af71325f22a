"""The fixed glibc mmap threshold (`training.mmap_threshold_kib`): freed large blocks go back to the OS."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from kwanzaa_adapter.config import ConfigError, load_training_config

# Large blocks (sizes varying like a training step's activations) between small long-lived objects:
# with glibc's dynamic threshold they come from the heap, which keeps them resident once freed.
SCRIPT = """
import sys
from kwanzaa_adapter.host_memory import fix_mmap_threshold

def rss_mb():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024

if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(1 << 20)
warm = [bytearray(4 << 20) for _ in range(2)]
del warm  # freeing an mmapped block raises glibc's dynamic threshold above its size
base = rss_mb()
live, pins = [], []
for i in range(64):
    live.append(bytearray((2 << 20) + 4096 * i))
    pins.append(bytearray(512))
live.clear()
print(rss_mb() - base)
"""


def retained_mb(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_fixed_threshold_returns_freed_blocks_that_the_dynamic_one_keeps():
    dynamic, fixed = retained_mb("dynamic"), retained_mb("fixed")
    assert fixed < 16, fixed
    assert dynamic - fixed > 64, (dynamic, fixed)  # 64 blocks of 2 MB+: the heap kept them


def test_threshold_is_bounded_in_the_config(tiny_run_config):
    config = load_training_config(tiny_run_config(training={"mmap_threshold_kib": 1024}))
    assert config.training.mmap_threshold_kib == 1024
    with pytest.raises(ConfigError, match="training.mmap_threshold_kib"):
        load_training_config(tiny_run_config(training={"mmap_threshold_kib": 0}))
