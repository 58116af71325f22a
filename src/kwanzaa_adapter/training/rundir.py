"""The run directory: its layout, its lock, and the versioning that keeps published artifacts untouched."""

from __future__ import annotations

import fcntl
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.safety.artifacts.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

ARTIFACT_DIRNAME = "final_artifact"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Checkpoints and artifacts are written under this prefix and renamed when complete; an entry that
# still carries it was left by a killed process.
TEMPORARY_PREFIX = ".tmp-"


class RunDirectoryError(Exception):
    """The output directory cannot take this run (bad input: exit 2)."""


def bump_patch(version: str) -> str:
    major, minor, patch = (int(p) for p in version.split("."))
    return f"{major}.{minor}.{patch + 1}"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


def published_version(run_path: Path) -> str | None:
    """Version of the artifact published in a run directory, if there is one."""
    metadata = run_path / ARTIFACT_DIRNAME / "metadata.json"
    if not (run_path / ARTIFACT_DIRNAME).exists():
        return None
    try:
        return json.loads(metadata.read_text())["artifact_version"]
    except (OSError, ValueError, KeyError):
        raise RunDirectoryError(f"{metadata}: published artifact without a readable artifact_version") from None


def checkpoints(run_path: Path) -> list[Path]:
    """The complete checkpoints (sealed with their manifest), oldest first."""
    if not run_path.is_dir():
        return []
    found = [p for p in run_path.iterdir()
             if CHECKPOINT.match(p.name) and p.is_dir() and (p / MANIFEST_NAME).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


@dataclass
class RunDirectory:
    path: Path
    version: str
    _lock: object = field(default=None, repr=False)

    baseline_path = property(lambda self: self.path / "baseline_checksums.json")
    artifact_path = property(lambda self: self.path / ARTIFACT_DIRNAME)
    adapter_path = property(lambda self: self.path / "adapter")
    tensorboard_path = property(lambda self: self.path / "tensorboard")
    history_path = property(lambda self: self.path / "metrics_history.jsonl")
    summary_path = property(lambda self: self.path / "training_summary.json")
    results_path = property(lambda self: self.path / "training_results.json")

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None


def _choose_path(config: KwanzaaConfig) -> tuple[Path, str]:
    """A fresh run of a name that already published goes beside it, with the next patch version."""
    base = config.run_dir
    if published_version(base) is None:
        if checkpoints(base):
            raise RunDirectoryError(
                f"{base}: holds checkpoints of an unfinished run; pass --resume to continue it, "
                "or choose another run.name / --output-dir"
            )
        return base, config.run.version
    versions = [published_version(base)]
    for sibling in base.parent.glob(f"{base.name}-v*"):
        if (v := published_version(sibling)) is not None:
            versions.append(v)
    version = max(bump_patch(max(versions, key=_version_key)), config.run.version, key=_version_key)
    path = base.parent / f"{base.name}-v{version}"
    if path.exists():
        raise RunDirectoryError(f"{path}: already exists; remove it or choose another run.name")
    return path, version


def open_run_directory(config: KwanzaaConfig, resume: bool = False) -> RunDirectory:
    if resume:
        path, version = config.run_dir, config.run.version
        if published_version(path) is not None:
            raise RunDirectoryError(f"{path}: already published an artifact; there is nothing to resume")
        if not checkpoints(path):
            raise RunDirectoryError(f"{path}: no checkpoint to resume from (none complete); "
                                    "start the run again without --resume")
    else:
        path, version = _choose_path(config)
    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunDirectoryError(f"{path}: another train process is using this run directory") from None
    remove_leftovers(path)
    return RunDirectory(path, version, handle)


def remove_leftovers(path: Path) -> None:
    """Delete what a killed run left half-written (`.tmp-*`); called with the run's lock held."""
    for entry in path.iterdir():
        if entry.name.startswith(TEMPORARY_PREFIX):
            log.info("removing %s, left by an interrupted run", entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
