"""The bytes that are used are the bytes that were verified: a sealed file read once, checked against its digest.

`verify_artifact` hashes every file; the backend then loads the adapter, the gate and the evidence selector,
minutes later for a large base model. Re-opening a file by its path there would load whatever lies at that
path by then. So each file is read once, into memory, its sha256 compared with the digest verification
found, and built from those bytes; the adapter goes to PEFT as a private copy of its verified bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path


class SealedFileChangedError(Exception):
    """A file of a verified artifact is not the file that was verified (exit 1)."""


def read_sealed(directory: str | Path, name: str, digests: Mapping[str, str] | None) -> bytes:
    """The bytes of `directory`/`name`, read once (never through a symlink); with `digests` (path -> sha256
    of the verified files), SealedFileChangedError unless they are the verified bytes."""
    path = Path(directory) / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        if digests is not None and name in digests:
            raise SealedFileChangedError(f"{path}: removed after the artifact was verified; refusing to go on "
                                         "without it") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise SealedFileChangedError(f"{path}: not a regular file")
        data = handle.read()
    if digests is None:
        return data
    if name not in digests:
        raise SealedFileChangedError(f"{path}: not among the files the artifact's verification checked; "
                                     "refusing to load it")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digests[name]:
        raise SealedFileChangedError(f"{path}: changed after the artifact was verified (sha256 {actual}, verified "
                                     f"{digests[name]}); refusing to load it: verify the artifact again")
    return data


@contextmanager
def sealed_copy(directory: str | Path, names: Sequence[str], digests: Mapping[str, str]) -> Iterator[Path]:
    """A private folder holding the verified bytes of `names` (read once each), removed afterwards."""
    private = Path(tempfile.mkdtemp(prefix="kwanzaa-verified-"))  # mode 0700: this user's only
    try:
        for name in names:
            if (Path(directory) / name).exists() or name in digests:
                target = private / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(read_sealed(directory, name, digests))
        yield private
    finally:
        shutil.rmtree(private, ignore_errors=True)
