"""Proofs about the model: base tensors unchanged (SHA-256 per tensor), only the adapter trainable.

Tensor names are canonical: the names of the plain base model, whether or not PEFT wraps it, so a
baseline taken before `get_peft_model` compares with checksums taken after training.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

ALGORITHM = "sha256"
BASELINE_FILENAME = "baseline_checksums.json"

# Path components that mark adapter tensors. A component match, not a substring one, so that a base
# module that merely contains "lora" in its name is still treated as base.
_ADAPTER_COMPONENT_PREFIXES = ("lora_", "trainable_tokens_")
_ADAPTER_COMPONENTS = frozenset({"modules_to_save"})
# The only tensors a saved LoRA adapter and the trainable set may hold.
_LORA_COMPONENT_PREFIXES = ("lora_A", "lora_B", "lora_embedding", "lora_magnitude")
# What PEFT adds around base names: a prefix and wrapper infixes that hold the original module.
_PEFT_PREFIX = "base_model.model."
_PEFT_INFIXES = frozenset({"base_layer", "original_module"})


class FreezeError(RuntimeError):
    """Something other than the LoRA adapter is trainable, or the adapter holds base tensors."""

    def __init__(self, message: str, names: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.names = names  # the offending parameter or tensor names


@dataclass(frozen=True)
class ChecksumDiff:
    """Tensor names that differ between a baseline and the current model."""

    changed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    added: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.added)

    def format(self) -> str:
        if self.ok:
            return "base weights unchanged: every tensor matches the baseline"
        lines = [
            f"base weights changed: {len(self.changed)} changed, {len(self.missing)} missing, "
            f"{len(self.added)} added tensor(s)"
        ]
        for label, names in (("changed", self.changed), ("missing", self.missing), ("added", self.added)):
            lines.extend(f"  {label:<8} {name}" for name in names)
        return "\n".join(lines)


class TrainableSummary(TypedDict):
    """Parameter counts (4-bit weights at their logical size), JSON-ready for metadata.json."""

    trainable: int
    total: int
    percent: float
    trainable_names: list[str]


@dataclass(frozen=True)
class DtypeChange:
    name: str
    before: torch.dtype
    after: torch.dtype

    def __str__(self) -> str:
        return f"{self.name}: {self.before} -> {self.after}"


# --- names -----------------------------------------------------------------------------------


def canonical_name(name: str) -> str:
    """The plain-model name of a (possibly PEFT-wrapped) tensor name."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return ".".join(part for part in name.split(".") if part not in _PEFT_INFIXES)


def is_adapter_tensor(name: str) -> bool:
    return any(
        part in _ADAPTER_COMPONENTS or part.startswith(_ADAPTER_COMPONENT_PREFIXES)
        for part in name.split(".")
    )


def is_lora_tensor(name: str) -> bool:
    return any(part.startswith(_LORA_COMPONENT_PREFIXES) for part in name.split("."))


# --- tensor hashing --------------------------------------------------------------------------


def _update_with_tensor(hasher: Any, tensor: torch.Tensor) -> None:
    """Feed the tensor's raw bytes to `hasher` without copying a CPU tensor that is contiguous."""
    # A plain tensor on the same storage: Params4bit overrides .to() and must not be re-quantized.
    t = tensor.detach().as_subclass(torch.Tensor)
    if t.device.type != "cpu":
        t = t.to("cpu")  # one tensor at a time: never the whole model on the host
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return
    hasher.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _tensor_entry(tensor: torch.Tensor) -> dict[str, Any]:
    hasher = hashlib.sha256()
    _update_with_tensor(hasher, tensor)
    return {
        "sha256": hasher.hexdigest(),
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }


def _dtype_name(dtype: Any) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _quant_state_parts(name: str, quant_state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a bitsandbytes QuantState, nested state included, under stable names."""
    prefix = f"{name}.quant_state"
    for attr in ("absmax", "code", "offset"):
        value = getattr(quant_state, attr, None)
        if isinstance(value, torch.Tensor):
            yield f"{prefix}.{attr}", value
    state2 = getattr(quant_state, "state2", None)
    if state2 is not None:
        for attr in ("absmax", "code", "offset"):
            value = getattr(state2, attr, None)
            if isinstance(value, torch.Tensor):
                yield f"{prefix}.state2.{attr}", value


def _quant_state_metadata(quant_state: Any) -> dict[str, Any]:
    """The scalar part of a QuantState: what dequantization needs besides the tensors."""
    shape = getattr(quant_state, "shape", None)
    meta: dict[str, Any] = {
        "shape": None if shape is None else list(shape),
        "dtype": _dtype_name(getattr(quant_state, "dtype", None)),
        "blocksize": getattr(quant_state, "blocksize", None),
        "quant_type": getattr(quant_state, "quant_type", None),
    }
    offset = getattr(quant_state, "offset", None)
    if offset is not None and not isinstance(offset, torch.Tensor):
        meta["offset"] = float(offset)
    state2 = getattr(quant_state, "state2", None)
    if state2 is not None:
        meta["state2"] = {
            "dtype": _dtype_name(getattr(state2, "dtype", None)),
            "blocksize": getattr(state2, "blocksize", None),
        }
    return meta


def _base_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for raw_name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not is_adapter_tensor(raw_name):
            yield canonical_name(raw_name), tensor


def model_digest(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    """SHA-256 over sorted `name:entry` lines; an entry holds digest, dtype, shape (and quant meta)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        entry = json.dumps(tensors[name], sort_keys=True, separators=(",", ":"))
        hasher.update(f"{name}:{entry}\n".encode())
    return hasher.hexdigest()


def compute_model_state_checksum(model: torch.nn.Module) -> dict[str, Any]:
    """SHA-256 of every base tensor (parameters, buffers, 4-bit quant state); adapters skipped."""
    tensors: dict[str, dict[str, Any]] = {}

    def add(name: str, entry: dict[str, Any]) -> None:
        if name in tensors:  # two raw names that canonicalise alike would silently hide a tensor
            raise ValueError(f"tensor name {name!r} occurs twice after removing PEFT wrappers")
        tensors[name] = entry

    for name, tensor in _base_tensors(model):
        if tensor.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device: load the weights first")
        entry = _tensor_entry(tensor)
        quant_state = getattr(tensor, "quant_state", None)
        if quant_state is not None:
            entry["quant_state"] = _quant_state_metadata(quant_state)
            for part_name, part in _quant_state_parts(name, quant_state):
                add(part_name, _tensor_entry(part))
        add(name, entry)
    return {"algorithm": ALGORITHM, "model_digest": model_digest(tensors), "tensors": tensors}


# --- baseline --------------------------------------------------------------------------------


def save_base_model_checksums(model: torch.nn.Module, path: str | Path) -> dict[str, Any]:
    """Write `baseline_checksums.json` (sorted keys) and return its content."""
    checksums = compute_model_state_checksum(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(checksums, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return checksums


def load_base_model_checksums(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: baseline checksums not found; save them before training") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable baseline checksum file ({exc})") from None
    if (
        not isinstance(data, dict)
        or data.get("algorithm") != ALGORITHM
        or not isinstance(data.get("tensors"), dict)
    ):
        raise ValueError(f'{path}: expected {{"algorithm": "sha256", "model_digest", "tensors": {{...}}}}')
    return data


def compare_model_checksums(baseline: Mapping[str, Any], current: Mapping[str, Any]) -> ChecksumDiff:
    """Tensor names changed (bytes, dtype, shape or quant metadata), missing, or added."""
    before, after = baseline["tensors"], current["tensors"]
    return ChecksumDiff(
        changed=tuple(sorted(n for n in before.keys() & after.keys() if before[n] != after[n])),
        missing=tuple(sorted(before.keys() - after.keys())),
        added=tuple(sorted(after.keys() - before.keys())),
    )


def verify_base_weights_unchanged(model: torch.nn.Module, baseline_path: str | Path) -> ChecksumDiff:
    baseline = load_base_model_checksums(baseline_path)
    return compare_model_checksums(baseline, compute_model_state_checksum(model))


# --- freeze checks ---------------------------------------------------------------------------


def _numel(param: torch.Tensor) -> int:
    # A 4-bit weight packs two values per byte; its quant state knows the logical shape.
    quant_state = getattr(param, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def get_trainable_parameters_summary(model: torch.nn.Module) -> TrainableSummary:
    trainable = total = 0
    names = []
    for name, param in model.named_parameters():
        count = _numel(param)
        total += count
        if param.requires_grad:
            trainable += count
            names.append(name)
    percent = 100.0 * trainable / total if total else 0.0
    return TrainableSummary(trainable=trainable, total=total, percent=percent, trainable_names=names)


def _raise_for_non_lora(names: Iterable[str], problem: str, fix: str) -> None:
    offenders = tuple(name for name in names if not is_lora_tensor(name))
    if offenders:
        listed = "\n".join(f"  {name}" for name in offenders)
        raise FreezeError(f"{len(offenders)} {problem}:\n{listed}\n{fix}", names=offenders)


def verify_only_adapter_trainable(model: torch.nn.Module) -> TrainableSummary:
    """Raise FreezeError naming every trainable non-LoRA parameter, or if nothing is trainable."""
    summary = get_trainable_parameters_summary(model)
    _raise_for_non_lora(
        summary["trainable_names"],
        "base parameter(s) are trainable; only LoRA tensors may be",
        "Freeze the base model (requires_grad_(False)) before adding the adapter.",
    )
    if not summary["trainable_names"]:
        raise FreezeError(
            "no parameter is trainable: the LoRA adapter is missing or frozen; "
            "check the adapter's target modules"
        )
    return summary


def verify_adapter_state_dict(state_dict: Mapping[str, Any]) -> None:
    """Raise FreezeError naming every tensor of a saved adapter that is not a LoRA tensor."""
    _raise_for_non_lora(
        sorted(state_dict),
        "non-adapter tensor(s) in the adapter",
        "Save with PEFT's save_pretrained and without modules_to_save.",
    )
    if not state_dict:
        raise FreezeError("the adapter holds no tensors")


def snapshot_dtypes(model: torch.nn.Module) -> dict[str, torch.dtype]:
    return {canonical_name(name): param.dtype for name, param in model.named_parameters()}


def report_dtype_changes(before: Mapping[str, torch.dtype], model: torch.nn.Module) -> list[DtypeChange]:
    """Parameters present before and now whose dtype changed (e.g. norms cast to fp32 for k-bit)."""
    now = snapshot_dtypes(model)
    return [
        DtypeChange(name, before[name], now[name])
        for name in sorted(before.keys() & now.keys())
        if before[name] != now[name]
    ]
