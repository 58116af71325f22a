"""The files of an artifact: safetensors headers, atomic publication, and the info table (SPEC section 7)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from helpers import sealed_artifact as artifact  # noqa: F401 - the fixture
from helpers import write_adapter_weights
from kwanzaa_adapter.safety.artifacts import (
    MANIFEST_NAME,
    REQUIRED_FILES,
    ArtifactError,
    SafetensorsHeaderError,
    atomic_directory,
    check_safetensors_header,
    format_info_table,
    seal_artifact,
    verify_artifact,
)

# --- safetensors header ---------------------------------------------------------------------


def _raw_safetensors(path: Path, header: dict | bytes, data: bytes) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def test_real_safetensors_header_passes(artifact: Path) -> None:
    header = check_safetensors_header(artifact / "adapter_model.safetensors")
    assert set(header) - {"__metadata__"} == {
        "base_model.model.layers.0.q_proj.lora_A.weight",
        "base_model.model.layers.0.q_proj.lora_B.weight",
    }


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, bytes(8), "outside"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
            "overlap",
        ),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(4), "needs 8 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8), "unused bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "cover 4"),
        ({"a": {"dtype": "PICKLE", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [1]}}, bytes(4), "expected exactly"),
        (b'{"a": 1', b"", "not valid UTF-8 JSON"),
        (b'{"a": {}, "a": {}}', b"", "repeats key"),
        (b"[1]", b"", "not a JSON object"),
    ],
    ids=["out-of-range", "overlap", "wrong-size", "gap", "trailing", "dtype", "keys", "json", "dup", "array"],
)
def test_malformed_safetensors_header_is_rejected(tmp_path: Path, header, data: bytes, message: str) -> None:
    path = _raw_safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(SafetensorsHeaderError, match=message):
        check_safetensors_header(path)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", struct.pack("<Q", 10**12) + b"{}"])
def test_truncated_or_oversized_header_length_is_rejected(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.safetensors").write_bytes(content)
    with pytest.raises(SafetensorsHeaderError):
        check_safetensors_header(tmp_path / "x.safetensors")


# --- atomic publication ---------------------------------------------------------------------


def test_atomic_directory_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out" / "final_artifact"
    with atomic_directory(final) as staging:
        assert staging.parent == final.parent and staging.name.startswith(".tmp-")
        (staging / "README.md").write_text("card")
        assert not final.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["final_artifact"]
    assert (final / "README.md").read_text() == "card"


def test_atomic_directory_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "final_artifact"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(final) as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_directory_refuses_an_existing_target(artifact: Path) -> None:
    before = sorted(p.name for p in artifact.parent.iterdir())
    with pytest.raises(ArtifactError, match="already exists"), atomic_directory(artifact):
        pass
    assert sorted(p.name for p in artifact.parent.iterdir()) == before
    assert verify_artifact(artifact).ok


def test_artifact_built_in_atomic_directory_verifies(tmp_path: Path) -> None:
    final = tmp_path / "final_artifact"
    with atomic_directory(final) as staging:
        for name in set(REQUIRED_FILES) - {MANIFEST_NAME, "adapter_model.safetensors"}:
            (staging / name).write_text(name)
        write_adapter_weights(staging / "adapter_model.safetensors")
        seal_artifact(staging)
    assert verify_artifact(final).ok


# --- info -----------------------------------------------------------------------------------


def test_info_table_flattens_nested_keys_into_two_columns() -> None:
    table = format_info_table(
        {"run_name": "demo", "base_model": {"id": "allenai/OLMo-7B-Instruct", "revision": None}},
        {"eval": {"loss": 1.234567891, "perplexity": 3.4}, "tags": ["a", "b"]},
    )
    lines = table.splitlines()
    assert lines[0].split() == ["key", "value"]
    rows = {line.split()[0]: line.split(None, 1)[1] for line in lines[2:] if not line.startswith("[")}
    assert rows == {
        "run_name": "demo",
        "base_model.id": "allenai/OLMo-7B-Instruct",
        "base_model.revision": "-",
        "eval.loss": "1.23457",
        "eval.perplexity": "3.4",
        "tags": '["a", "b"]',
    }
    assert [line for line in lines if line.startswith("[")] == ["[metadata]", "[metrics]"]
    value_columns = {line.index(line.split(None, 1)[1]) for line in lines[2:] if not line.startswith("[")}
    assert len(value_columns) == 1  # values line up in one column
