"""Artifact manifest and verification: changed, missing and extra files, unsafe paths and file kinds (SPEC section 7)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from helpers import sealed_artifact as artifact  # noqa: F401 - the fixture
from kwanzaa_adapter.safety.artifacts import (
    MANIFEST_NAME,
    REQUIRED_FILES,
    ArtifactError,
    FileEntry,
    Manifest,
    build_manifest,
    load_manifest,
    seal_artifact,
    verify_artifact,
    write_manifest,
)


def _manifest_json(root: Path) -> dict:
    return json.loads((root / MANIFEST_NAME).read_text())


def _write_raw_manifest(root: Path, text: str) -> None:
    (root / MANIFEST_NAME).write_text(text)


# --- manifest -------------------------------------------------------------------------------


def test_sealed_artifact_verifies_and_manifest_lists_every_other_file(artifact: Path) -> None:
    report = verify_artifact(artifact)
    assert report.ok, report.format()
    expected = (set(REQUIRED_FILES) - {MANIFEST_NAME}) | {"assets/curve.png"}
    assert set(_manifest_json(artifact)["files"]) == expected
    assert set(report.verified) == expected
    assert report.format().startswith("OK ")


def test_manifest_file_is_sorted_json_with_digest_and_size(artifact: Path) -> None:
    text = (artifact / MANIFEST_NAME).read_text()
    data = json.loads(text)
    assert list(data) == ["algorithm", "files"]
    assert list(data["files"]) == sorted(data["files"])
    assert data["algorithm"] == "sha256"
    readme = (artifact / "README.md").read_bytes()
    assert data["files"]["README.md"] == {"sha256": hashlib.sha256(readme).hexdigest(), "size": len(readme)}
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"


def test_manifest_round_trips_through_write_and_load(tmp_path: Path) -> None:
    manifest = Manifest((FileEntry("b.txt", "b" * 64, 2), FileEntry("a/c.txt", "a" * 64, 1)))
    write_manifest(manifest, tmp_path / MANIFEST_NAME)
    assert load_manifest(tmp_path / MANIFEST_NAME) == manifest
    assert [e.path for e in manifest.files] == ["a/c.txt", "b.txt"]


def test_build_manifest_streams_files_larger_than_one_chunk(tmp_path: Path) -> None:
    payload = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "big.bin.part").write_bytes(payload)
    (tmp_path / MANIFEST_NAME).write_text("{}")
    manifest = build_manifest(tmp_path)
    assert manifest.files == (FileEntry("big.bin.part", hashlib.sha256(payload).hexdigest(), len(payload)),)


def test_load_manifest_refuses_unsafe_path(tmp_path: Path) -> None:
    entry = {"sha256": "0" * 64, "size": 0}
    _write_raw_manifest(tmp_path, json.dumps({"algorithm": "sha256", "files": {"../x": entry}}))
    with pytest.raises(ArtifactError, match=r"'\.\./x' manifest path contains '\.\.'"):
        load_manifest(tmp_path / MANIFEST_NAME)


# --- verify: changed, missing, extra --------------------------------------------------------


def test_flipped_byte_is_reported_with_path(artifact: Path) -> None:
    target = artifact / "training_metrics.json"
    original = target.read_bytes()
    target.write_bytes(bytes([original[0] ^ 0x01]) + original[1:])
    report = verify_artifact(artifact)
    assert not report.ok
    assert [m.path for m in report.mismatched] == ["training_metrics.json"]
    mismatch = report.mismatched[0]
    assert mismatch.expected_sha256 == hashlib.sha256(original).hexdigest()
    assert mismatch.actual_sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    assert mismatch.expected_size == mismatch.actual_size == len(original)
    assert (report.missing, report.extra, report.rejected) == ((), (), ())
    assert "mismatched  training_metrics.json" in report.format()


def test_missing_file_is_reported(artifact: Path) -> None:
    (artifact / "assets" / "curve.png").unlink()
    report = verify_artifact(artifact)
    assert report.missing == ("assets/curve.png",)
    assert (report.extra, report.mismatched, report.rejected) == ((), (), ())
    assert "missing     assets/curve.png" in report.format()


def test_missing_required_file_is_reported_even_when_resealed(artifact: Path) -> None:
    (artifact / "README.md").unlink()
    seal_artifact(artifact)
    report = verify_artifact(artifact)
    assert report.missing == ("README.md",)
    assert not report.ok


def test_extra_file_is_reported(artifact: Path) -> None:
    (artifact / "notes.txt").write_text("added after sealing")
    report = verify_artifact(artifact)
    assert report.extra == ("notes.txt",)
    assert (report.missing, report.mismatched, report.rejected) == ((), (), ())
    assert "extra       notes.txt" in report.format()


def test_missing_manifest_is_reported_as_missing(artifact: Path) -> None:
    (artifact / MANIFEST_NAME).unlink()
    report = verify_artifact(artifact)
    assert report.missing == (MANIFEST_NAME,)
    assert not report.ok


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"algorithm": "md5", "files": {}}',
        '{"algorithm": "sha256"}',
        '{"algorithm": "sha256", "files": {"README.md": {"sha256": "XYZ", "size": 1}}}',
        '{"algorithm": "sha256", "files": {"README.md": {"sha256": "' + "0" * 64 + '", "size": -1}}}',
        '{"algorithm": "sha256", "files": {"README.md": {"sha256": "' + "0" * 64 + '", "size": true}}}',
        '{"algorithm": "sha256", "files": {}, "signature": "x"}',
        '{"algorithm": "sha256", "algorithm": "sha256", "files": {}}',
    ],
    ids=[
        "not-json", "array", "md5", "no-files", "bad-hex", "negative-size", "bool-size", "unknown-key", "dup-key"
    ],
)
def test_malformed_manifest_is_rejected(artifact: Path, text: str) -> None:
    _write_raw_manifest(artifact, text)
    report = verify_artifact(artifact)
    assert [r.path for r in report.rejected] == [MANIFEST_NAME]
    assert "unreadable or malformed" in report.rejected[0].reason
    with pytest.raises(ArtifactError):
        load_manifest(artifact / MANIFEST_NAME)


def test_unreadable_manifest_is_rejected(artifact: Path) -> None:
    (artifact / MANIFEST_NAME).write_bytes(b"\xff\xfe not utf-8")
    report = verify_artifact(artifact)
    assert [r.path for r in report.rejected] == [MANIFEST_NAME]


def test_nonexistent_directory_gives_a_report_not_a_traceback(tmp_path: Path) -> None:
    report = verify_artifact(tmp_path / "nope")
    assert not report.ok
    assert "does not exist" in report.format()


def test_file_instead_of_directory_gives_a_report(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    assert "is not a directory" in verify_artifact(tmp_path / "file").format()


# --- verify: unsafe paths and file kinds ----------------------------------------------------


def _add_manifest_entry(root: Path, path: str) -> None:
    data = _manifest_json(root)
    data["files"][path] = {"sha256": "0" * 64, "size": 0}
    _write_raw_manifest(root, json.dumps(data))


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside.txt", "contains '..'"),
        ("assets/../../outside.txt", "contains '..'"),
        ("/etc/passwd", "is absolute"),
        ("assets\\curve.png", "backslash"),
        ("README.md\x00.png", "NUL byte"),
        ("./README.md", "not a normalised path"),
        ("assets//curve.png", "not a normalised path"),
        (MANIFEST_NAME, "cannot list itself"),
    ],
)
def test_dotdot_path_in_manifest_is_rejected(artifact: Path, path: str, reason: str) -> None:
    _add_manifest_entry(artifact, path)
    report = verify_artifact(artifact)
    assert [r.path for r in report.rejected] == [path]
    assert reason in report.rejected[0].reason
    assert (report.missing, report.extra, report.mismatched) == ((), (), ())


def test_duplicate_manifest_entry_is_rejected(artifact: Path) -> None:
    text = (artifact / MANIFEST_NAME).read_text()
    entry = '"README.md": {"sha256": "' + "0" * 64 + '", "size": 1},'
    _write_raw_manifest(artifact, text.replace('"files": {', '"files": {' + entry, 1))
    report = verify_artifact(artifact)
    assert [(r.path, r.reason) for r in report.rejected] == [
        ("README.md", f"is listed more than once in {MANIFEST_NAME}")
    ]
    assert report.extra == ()
    with pytest.raises(ArtifactError, match="more than once"):
        load_manifest(artifact / MANIFEST_NAME)


def test_manifest_entry_that_is_a_directory_is_rejected(artifact: Path) -> None:
    _add_manifest_entry(artifact, "assets")
    report = verify_artifact(artifact)
    assert [(r.path, r.reason) for r in report.rejected] == [
        ("assets", "is listed but is not a regular file inside the artifact")
    ]


@pytest.mark.parametrize("kind", ["file", "directory", "dangling"])
def test_symlink_is_rejected(artifact: Path, tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the artifact")
    target = {"file": outside / "secret.txt", "directory": outside, "dangling": tmp_path / "gone"}[kind]
    (artifact / "assets" / "link").symlink_to(target)
    report = verify_artifact(artifact)
    assert [(r.path, r.reason) for r in report.rejected] == [
        ("assets/link", "is a symlink; artifacts hold regular files only")
    ]
    assert report.extra == ()  # a symlink is rejected, not counted as an unlisted file


def test_symlinked_artifact_directory_is_rejected(artifact: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(artifact)
    assert "is a symlink" in verify_artifact(link).format()


def test_seal_refuses_a_directory_with_a_symlink(artifact: Path, tmp_path: Path) -> None:
    (artifact / "link").symlink_to(artifact / "README.md")
    with pytest.raises(ArtifactError, match="link is a symlink"):
        seal_artifact(artifact)


@pytest.mark.parametrize("name", ["model.bin", "weights.pt", "w.PTH", "state.pkl", "x.pickle", "last.ckpt"])
def test_pickle_file_is_rejected_even_when_listed(artifact: Path, name: str) -> None:
    torch.save({"w": torch.zeros(2)}, artifact / name)
    seal_artifact(artifact)
    report = verify_artifact(artifact)
    assert [r.path for r in report.rejected] == [name]
    assert "pickle-format" in report.rejected[0].reason


def test_pickle_renamed_safetensors_is_rejected(artifact: Path) -> None:
    torch.save({"lora_A.weight": torch.zeros(4, 4)}, artifact / "adapter_model.safetensors")
    seal_artifact(artifact)
    report = verify_artifact(artifact)
    assert [r.path for r in report.rejected] == ["adapter_model.safetensors"]
    assert "not a valid safetensors file" in report.rejected[0].reason
