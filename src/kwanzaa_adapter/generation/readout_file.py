"""The file of a linear read-out (the answerability gate, the evidence selector): a standardised logistic regression
as safetensors (weight, bias, mean, scale, float32) with the read-out's settings in the header, read once."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from kwanzaa_adapter.safety.artifacts import read_sealed

TENSORS = ("weight", "bias", "mean", "scale")
Readout = TypeVar("Readout")


def save_readout(path: str | Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    path = Path(path)
    save_file({name: tensors[name].float().contiguous() for name in TENSORS}, str(path), metadata=header)
    return path


def read_readout(path: Path, error: type[ValueError], kind: str, digests: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors) from the file's bytes, read once (with `digests`, the sha256 of an artifact's verified
    files: only the verified bytes, `SealedFileChangedError` otherwise); `error(...)` naming the file when it is
    not a read-out (a missing tensor, a bad header) or its vectors do not share one width with a one-value bias."""
    try:
        data = read_sealed(path.parent, path.name, digests)
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + length]).get("__metadata__") or {}
        tensors = load(data)
        missing = [name for name in TENSORS if name not in tensors]
        if missing:
            raise KeyError(f"no {', '.join(missing)}")
    except (KeyError, ValueError, OSError, SafetensorError, struct.error) as exc:
        raise error(f"{path}: not {kind} file ({type(exc).__name__}: {exc})") from None
    width = tensors["weight"].shape
    if len(width) != 1 or tensors["mean"].shape != width or tensors["scale"].shape != width \
            or tensors["bias"].numel() != 1:
        raise error(f"{path}: weight, mean and scale must be vectors of one width and bias one value")
    return header, tensors


def load_readout(artifact: str | Path, name: str, digests: Mapping[str, str] | None, error: type[ValueError], kind: str,
                 header_holds: dict[str, str], build: Callable[[dict, dict], Readout]) -> Readout | None:
    """`build(header, tensors)` from the read-out file `name` of an artifact (verified by the caller; with
    `digests`, only from the verified bytes), or None when it has none; `error(...)` naming the file when
    its header does not hold `header_holds` or `build` finds a value missing or malformed."""
    path = Path(artifact) / name
    if not path.is_file() and (digests is None or name not in digests):  # verified with one: it must be there
        return None
    header, tensors = read_readout(path, error, kind, digests)
    found = {key: header.get(key) for key in header_holds}
    if found != header_holds:
        raise error(f"{path}: {found}, expected {header_holds}")
    try:
        return build(header, tensors)
    except (KeyError, ValueError) as exc:
        raise error(f"{path}: not {kind} file ({type(exc).__name__}: {exc})") from None
