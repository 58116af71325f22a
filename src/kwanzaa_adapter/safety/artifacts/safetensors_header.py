"""Structural check of a .safetensors file from its header alone: no tensor is loaded.

Layout: 8-byte little-endian header length N, N bytes of JSON header, then the data area. Each
tensor's `data_offsets` are relative to the data area; together they tile it exactly.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

# The safetensors reader refuses larger headers too.
MAX_HEADER_BYTES = 100_000_000
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip


class SafetensorsHeaderError(ValueError):
    pass


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if duplicates := sorted({k for k in keys if keys.count(k) > 1}):
        raise SafetensorsHeaderError(f"header repeats key(s) {duplicates}")
    return dict(pairs)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tensor(name: str, info: Any, data_size: int) -> tuple[int, int]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsHeaderError(f"tensor {name!r}: expected exactly dtype, shape, data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise SafetensorsHeaderError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise SafetensorsHeaderError(f"tensor {name!r}: shape must be a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets must be [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise SafetensorsHeaderError(
            f"tensor {name!r}: data_offsets [{begin}, {end}] fall outside the {data_size}-byte data area"
        )
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or bits // 8 != end - begin:
        raise SafetensorsHeaderError(
            f"tensor {name!r}: {dtype}{shape} needs {bits / 8:g} bytes, offsets give {end - begin}"
        )
    return begin, end


def check_safetensors_header(path: str | Path) -> dict[str, Any]:
    """Return the parsed header, or raise SafetensorsHeaderError saying what is malformed."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SafetensorsHeaderError(f"only {file_size} bytes: shorter than the 8-byte header length")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(file_size - 8, MAX_HEADER_BYTES):
            raise SafetensorsHeaderError(
                f"header length {header_size} exceeds the file ({file_size} bytes): not a safetensors file"
            )
        raw = handle.read(header_size)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsHeaderError(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsHeaderError("__metadata__ must map strings to strings")

    data_size = file_size - 8 - header_size
    spans = sorted(
        _check_tensor(name, info, data_size) for name, info in header.items() if name != "__metadata__"
    )
    position = 0
    for begin, end in spans:
        if begin < position:
            raise SafetensorsHeaderError(f"tensor data overlap at byte {begin} of the data area")
        if begin > position:
            raise SafetensorsHeaderError(f"unused bytes {position}..{begin} in the data area")
        position = end
    if position != data_size:
        raise SafetensorsHeaderError(f"data area has {data_size} bytes but tensors cover {position}")
    return header


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def nonfinite_tensors(path: str | Path, header: dict[str, Any]) -> list[str]:
    """Names of floating-point tensors holding NaN or infinity (call after the header check passed).

    A NaN adapter weight turns every generation into garbage, and checksums cannot tell: a run that
    diverged seals its NaNs as faithfully as good weights.
    """
    import torch
    from safetensors import safe_open

    names = [n for n, info in header.items() if n != "__metadata__" and info["dtype"] in FLOAT_DTYPES]
    bad = []
    with safe_open(str(path), framework="pt") as handle:
        for name in names:
            if not bool(torch.isfinite(handle.get_tensor(name)).all()):
                bad.append(name)
    return bad
