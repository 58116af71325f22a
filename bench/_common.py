"""What every bench prints beside its figures: the CPU class the figures were measured on."""

from __future__ import annotations

import os
from pathlib import Path


def cpu_class() -> str:
    """bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else AVX2; under bench/as_avx2.sh on a
    bf16 CPU, says so and which llama.cpp build ran."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = "bf16 (AVX512-BF16/AMX)" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "AVX2"
    if os.environ.get("ATEN_CPU_CAPABILITY") == "avx2" and native != "AVX2":
        llama = "AVX2 build" if os.environ.get("LLAMA_CPP_LIB_PATH") else "native (AVX-512) build"
        return f"AVX2 (bench/as_avx2.sh on a {native} CPU; llama.cpp {llama})"
    return native
