"""Hostile artifacts: a sealed adapter directory broken after sealing (a flipped byte, a missing or extra
file, a bad manifest entry, a symlink or FIFO inside), weights that are not sound safetensors or hold NaN
even with a manifest that matches them, and paths that are not an artifact directory.

Every case is refused by `verify` with exit 1. `_sealed_artifact()` is also what signatures.py seals.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from .corpus_base import Case


def _sealed_artifact(case_dir: Path, weights: dict[str, torch.Tensor] | None = None) -> Path:
    from kwanzaa_adapter.safety.artifacts import seal_artifact

    root = case_dir / "artifact"
    root.mkdir()
    (root / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}\n')
    tensors = weights or {"base_model.model.layers.0.q_proj.lora_A.weight": torch.ones(4, 8)}
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "metadata.json").write_text('{"artifact_version": "1.0.0"}\n')
    (root / "training_config.yaml").write_text("run:\n  name: hostile\n")
    (root / "training_metrics.json").write_text('{"eval_loss": 1.5}\n')
    (root / "README.md").write_text("# Adapter\n")
    seal_artifact(root)
    return root


def _raw_safetensors(header: dict | bytes, data: bytes, declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _artifact_cases() -> dict[str, Case]:
    def after_seal(change: Callable[[Path], None], reseal: bool = False):
        def make(case_dir: Path) -> tuple[str, ...]:
            root = _sealed_artifact(case_dir)
            change(root)
            if reseal:
                from kwanzaa_adapter.safety.artifacts import build_manifest, write_manifest

                write_manifest(build_manifest(root), root / "checksums.json")
            return ("verify", str(root))

        return make

    def weights_file(content: bytes):
        return after_seal(lambda root: (root / "adapter_model.safetensors").write_bytes(content), reseal=True)

    def manifest_entry(path: str):
        def change(root: Path) -> None:
            manifest = json.loads((root / "checksums.json").read_text())
            manifest["files"][path] = {"sha256": "0" * 64, "size": 1}
            (root / "checksums.json").write_text(json.dumps(manifest))

        return after_seal(change)

    def flip_byte(root: Path) -> None:
        path = root / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))

    def duplicate_entry(root: Path) -> None:
        text = (root / "checksums.json").read_text()
        entry = '"README.md": {"sha256": "' + "0" * 64 + '", "size": 1}, '
        (root / "checksums.json").write_text(text.replace('"README.md": ', entry + '"README.md": ', 1))

    def nan_weights(case_dir: Path) -> tuple[str, ...]:
        tensor = torch.ones(4, 8)
        tensor[1, 2] = float("nan")
        return ("verify", str(_sealed_artifact(case_dir, {"base_model.model.layers.0.q_proj.lora_A.weight": tensor})))

    def symlinked_dir(case_dir: Path) -> tuple[str, ...]:
        root = _sealed_artifact(case_dir)
        (case_dir / "link").symlink_to(root)
        return ("verify", str(case_dir / "link"))

    def missing_dir(case_dir: Path) -> tuple[str, ...]:
        return ("verify", str(case_dir / "absent"))

    def file_not_dir(case_dir: Path) -> tuple[str, ...]:
        (case_dir / "artifact").write_text("not a directory")
        return ("verify", str(case_dir / "artifact"))

    span = {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    overlap = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    return {
        "artifact_flipped_byte": ("mismatched adapter_model.safetensors: sha256 expected", after_seal(flip_byte)),
        "artifact_missing_weights": (
            "missing adapter_model.safetensors",
            after_seal(lambda root: (root / "adapter_model.safetensors").unlink())),
        "artifact_missing_manifest": (
            "missing checksums.json", after_seal(lambda root: (root / "checksums.json").unlink())),
        "artifact_manifest_not_json": (
            "checksums.json: not valid JSON", after_seal(lambda root: (root / "checksums.json").write_text("{nope"))),
        "artifact_manifest_is_list": (
            "checksums.json: expected an object",
            after_seal(lambda root: (root / "checksums.json").write_text("[]"))),
        "artifact_extra_file": (
            "extra notes.txt (not listed in checksums.json)",
            after_seal(lambda root: (root / "notes.txt").write_text("hello"))),
        "artifact_truncated_header": ("shorter than the 8-byte header length", weights_file(b"\x10\x00\x00")),
        "artifact_oversized_header_length": (
            "header length 1099511627776 exceeds the file",
            weights_file(_raw_safetensors(span, bytes(8), declared=2**40))),
        "artifact_header_not_json": (
            "header is not valid UTF-8 JSON", weights_file(_raw_safetensors(b"{not json}", bytes(8)))),
        "artifact_overlapping_offsets": ("tensor data overlap", weights_file(_raw_safetensors(overlap, bytes(12)))),
        "artifact_offsets_past_end": (
            "data_offsets [0, 8] fall outside the 4-byte data area", weights_file(_raw_safetensors(span, bytes(4)))),
        "artifact_nan_weights": ("holds NaN or infinite values", nan_weights),
        "artifact_pickle_renamed": (
            "adapter_model.safetensors: is not a valid safetensors file",
            weights_file(pickle.dumps({"weight": [1.0, 2.0]}))),
        "artifact_pickle_file_listed": ("optimizer.pt: is a pickle-format file", after_seal(
            lambda root: (root / "optimizer.pt").write_bytes(pickle.dumps({"x": 1})), reseal=True)),
        "artifact_manifest_dotdot": ("manifest path contains '..'", manifest_entry("../outside.txt")),
        "artifact_manifest_absolute": ("manifest path is absolute", manifest_entry("/etc/passwd")),
        "artifact_manifest_nul": ("manifest path contains a NUL byte", manifest_entry("adapter\x00.safetensors")),
        "artifact_manifest_duplicate": ("README.md: is listed more than once", after_seal(duplicate_entry)),
        "artifact_symlink_inside": (
            "link.json: is a symlink", after_seal(lambda root: (root / "link.json").symlink_to("/etc/hostname"))),
        "artifact_fifo_inside": (
            "pipe.json: is not a regular file", after_seal(lambda root: os.mkfifo(root / "pipe.json"))),
        "artifact_symlinked_directory": ("link: is a symlink; give the real artifact directory", symlinked_dir),
        "artifact_directory_missing": ("absent: does not exist", missing_dir),
        "artifact_is_a_file": ("artifact: is not a directory", file_not_dir),
    }

