#!/usr/bin/env bash
# On the GPU machine: the wheels of bench/pack_gpu_wheels.sh (carried in .gpu-wheels/) unpacked into a
# private site directory (only those missing there or older than packed: the machine's own Python is
# left as it is), the package from src/ by PYTHONPATH (no build, no network), then bench/gpu_check.py
# --device cuda under a time limit.
#
#   bash bench/gpu_check.sh [gpu_check.py options, e.g. --budget-s 420]
#
# gpu_check.json (rewritten after every stage, so a run cut short keeps what it measured) and
# gpu_check.log go to $OUT when it is set, else to the temporary directory it prints.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/kwanzaa-gpu-check.XXXXXX")
RESULTS=${OUT:-$WORK}
mkdir -p "$RESULTS"
echo "work directory $WORK, results in $RESULTS"

"$PY" - "$WHEELS" "$WORK/site" <<'EOF'
import importlib.metadata as md
import sys
import zipfile
from pathlib import Path

from packaging.version import Version

wheels, site = Path(sys.argv[1]), Path(sys.argv[2])
if not any(wheels.glob("*.whl")):
    sys.exit(f"no wheels in {wheels}: run bench/pack_gpu_wheels.sh where there is a network, and carry its folder")
for wheel in sorted(wheels.glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        here = md.version(name)
    except md.PackageNotFoundError:
        here = None
    if here is not None and Version(here) >= Version(version):
        print(f"  {name} {here}: already here")
        continue
    zipfile.ZipFile(wheel).extractall(site)  # a wheel is its site-packages layout, dist-info included
    print(f"  {name} {version}: unpacked" + (f" over {here}" if here else ""))
EOF
mkdir -p "$WORK/tokenizer"
tar -xzf "$WHEELS/smollm2-tokenizer.tar.gz" -C "$WORK/tokenizer"
export PYTHONPATH="$WORK/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

# The check keeps within --budget-s (480 s by default); the limit here catches a stage stuck in a kernel.
status=0
timeout --signal=INT --kill-after=30 "${LIMIT_S:-560}" "$PY" bench/gpu_check.py --device cuda \
    --tokenizer "$WORK/tokenizer" --json-out "$RESULTS/gpu_check.json" "$@" 2>&1 | tee "$RESULTS/gpu_check.log" \
    || status=$?
echo "exit $status; JSON: $RESULTS/gpu_check.json"
exit "$status"
