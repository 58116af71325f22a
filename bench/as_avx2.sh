#!/usr/bin/env bash
# Run a command as on a CPU without AVX-512 (the AVX2 class: most laptops, older cloud CPUs).
#
#   bench/as_avx2.sh .venv/bin/python scripts/demo.py
#   bench/as_avx2.sh .venv/bin/python bench/throughput.py
#
# PyTorch's own kernels (ATen), oneDNN and MKL are limited to AVX2, so fp32 products run at the
# AVX2 rate (~130-165 GFLOP/s on 2 cores instead of ~300 with AVX-512) and bf16 has no native
# kernel (~1-2.5 GFLOP/s): the precision probe sees what an AVX2 machine shows it, and chooses
# fp32. Forcing fp32 on an AVX-512 machine is not the same: its fp32 products run twice as fast.
# bitsandbytes' own 4-bit kernels are not limited by these variables (bench/NOTES.md).
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
# llama.cpp is compiled for one instruction set: the fast engine and llama-bench run the AVX2-only
# build (`scripts/build_llamacpp.sh .venv avx2`) where it exists, else they would use AVX-512.
here="$(cd "$(dirname "$0")/.." && pwd)"
if [ -d "$here/.venv/llama.cpp/build-avx2/bin" ]; then
    export LLAMA_CPP_LIB_PATH="$here/.venv/llama.cpp/build-avx2/bin"
else
    echo "as_avx2.sh: no AVX2 build of llama.cpp (scripts/build_llamacpp.sh .venv avx2): it runs with AVX-512" >&2
fi
exec "$@"
