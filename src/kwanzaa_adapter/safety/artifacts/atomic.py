"""Atomic publication of an artifact directory, and sealing it with its manifest."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kwanzaa_adapter.safety.artifacts.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    ArtifactError,
    Manifest,
    build_manifest,
    write_manifest,
)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (directories too: they hold the names)."""
    for current, dirs, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(current, name)):
                fsync_path(Path(current, name))
        fsync_path(Path(current))


@contextmanager
def atomic_directory(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling `.tmp-*` directory; on success it is fsynced and renamed to
    `final_dir`, on any exception removed. `final_dir` never holds a partial artifact."""
    final = Path(final_dir)
    if final.exists() or final.is_symlink():
        raise ArtifactError(
            f"{final} already exists; a published artifact is never overwritten: "
            "choose another output directory or remove it deliberately"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published artifact is readable by all
        yield tmp
        fsync_tree(tmp)
        # Checked again: another writer may have published meanwhile, and rename() would silently
        # replace an empty directory.
        if final.exists() or final.is_symlink():
            raise ArtifactError(f"{final} appeared while the artifact was being written; not replacing it")
        os.rename(tmp, final)
        fsync_path(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seal_artifact(directory: str | Path) -> Manifest:
    """Write `checksums.json` over every other file of `directory` but a signature; return the manifest."""
    directory = Path(directory)
    manifest = build_manifest(directory, exclude=(MANIFEST_NAME, SIGNATURE_NAME))
    write_manifest(manifest, directory / MANIFEST_NAME)
    return manifest
