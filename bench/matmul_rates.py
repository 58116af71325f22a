"""Matrix-product rates in fp32 and bf16 at the demo model's shapes: which CPU class is this?

    python bench/matmul_rates.py                    # this machine
    bench/as_avx2.sh .venv/bin/python bench/matmul_rates.py   # the same machine limited to AVX2

Prints one line per shape and dtype (GFLOP/s, best of 5 x 10 products) and a JSON line. On the
2-core sandbox with AVX512-BF16/AMX, bf16 runs 1.4-3.3x fp32; limited to AVX2, bf16 falls to
1-2.5 GFLOP/s, about 100x below fp32 (bench/NOTES.md, "Precision").
"""

from __future__ import annotations

import json
import time

import torch

# A square reference, the MLP up/down projections over a 512-token row, and a 24-prompt decoding step.
SHAPES = ((1024, 1024, 1024), (512, 576, 1536), (512, 1536, 576), (24, 576, 1536))
EMULATED_BUDGET_SECONDS = 2.0  # an emulated bf16 kernel gets one timed product, not fifty


def rate(dtype: torch.dtype, m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    tick = time.perf_counter()
    a @ b  # warm-up
    first = time.perf_counter() - tick
    if first > EMULATED_BUDGET_SECONDS / 10:
        return 2 * m * k * n / first / 1e9
    best = float("inf")
    for _ in range(5):
        tick = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - tick) / 10)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    results = {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        for shape in SHAPES:
            gflops = rate(dtype, *shape)
            results[f"{name} {'x'.join(map(str, shape))}"] = round(gflops, 1)
            print(f"{name:9} {'x'.join(map(str, shape)):>15}  {gflops:8.1f} GFLOP/s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
