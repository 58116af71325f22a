"""Complete-or-absent checkpoints, and the checks before a run resumes from one.

A checkpoint is written under `.tmp-checkpoint-N`, given its own `checksums.json` (which covers
`run_identity.json`: the resolved-config digest, the dataset digests and the base-model digest),
flushed to disk and only then renamed to `checkpoint-N`. A `checkpoint-N` without its manifest is
not one (`rundir.checkpoints()` skips it); a `.tmp-*` entry is what a killed process left behind
and is removed when the run directory is next opened.

Resume takes the newest complete checkpoint. One whose files no longer match its manifest is
refused, naming the files, rather than silently replaced by an older one: it can only come from a
disk fault or a hand edit, and the person resuming should decide (delete it to resume from the
previous checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kwanzaa_adapter.safety.artifacts.atomic import fsync_path, fsync_tree, seal_artifact
from kwanzaa_adapter.safety.artifacts.manifest import MANIFEST_NAME, ArtifactError, build_manifest, load_manifest
from kwanzaa_adapter.training.rundir import TEMPORARY_PREFIX, RunDirectoryError, checkpoints

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run that resumes it."""

    config_sha256: str
    datasets: dict  # split -> sha256 of the data file
    base_model_digest: str

    @classmethod
    def of_run(cls, config, baseline: dict) -> "RunIdentity":
        from kwanzaa_adapter.safety.artifacts import sha256_file

        files = {"train": config.data.train_file, "eval": config.data.eval_file}
        return cls(config.digest(), {split: sha256_file(path, follow_symlinks=True)[0] for split, path in files.items()},
                   baseline["model_digest"])

    def write(self, directory: Path) -> None:
        (directory / IDENTITY_FILE).write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: Path) -> "RunIdentity":
        path = directory / IDENTITY_FILE
        try:
            return cls(**json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise RunDirectoryError(f"{path}: unreadable run identity ({exc})") from None

    def differences(self, current: "RunIdentity") -> list[str]:
        """What differs between this (the checkpoint's) identity and the current run's, in words."""
        found = []
        if self.config_sha256 != current.config_sha256:
            found.append(f"resolved config (digest {self.config_sha256[:12]} in the checkpoint, "
                         f"{current.config_sha256[:12]} now)")
        for split in sorted(set(self.datasets) | set(current.datasets)):
            before, now = self.datasets.get(split), current.datasets.get(split)
            if before != now:
                found.append(f"{split} dataset (sha256 {str(before)[:12]} in the checkpoint, {str(now)[:12]} now)")
        if self.base_model_digest != current.base_model_digest:
            found.append(f"base model (digest {self.base_model_digest[:12]} in the checkpoint, "
                         f"{current.base_model_digest[:12]} now)")
        return found


def staging_path(final: Path) -> Path:
    return final.with_name(f"{TEMPORARY_PREFIX}{final.name}")


def publish_checkpoint(staging: Path, final: Path, identity: RunIdentity) -> None:
    """Seal a fully written staging directory and rename it to `final` (replacing a stale one)."""
    from kwanzaa_adapter.training.faults import fault_point

    identity.write(staging)
    seal_artifact(staging)
    fault_point("checkpoint_sealed")
    fsync_tree(staging)
    if final.exists():  # the same step saved again (a resumed run): retire the old one first
        discard(final)
    os.rename(staging, final)
    fsync_path(final.parent)


def discard(directory: Path) -> None:
    """Remove a directory so that no half-deleted version of it is ever visible under its name."""
    doomed = directory.with_name(f"{TEMPORARY_PREFIX}deleted-{directory.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(directory, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def rotate_checkpoints(run_path: Path, limit: int | None, keep: str | None = None) -> None:
    """Keep the newest `limit` complete checkpoints, and the best one (`keep`) besides."""
    if not limit:
        return
    from kwanzaa_adapter.training.faults import fault_point

    found = checkpoints(run_path)
    for old in found[:-limit]:
        if keep is None or old.resolve() != Path(keep).resolve():
            fault_point("checkpoint_rotate")
            discard(old)


def checkpoint_problems(directory: Path) -> list[str]:
    """Files of a checkpoint that no longer match its manifest, in words; empty when it is intact."""
    try:
        expected = load_manifest(directory / MANIFEST_NAME)
        actual = build_manifest(directory)
    except ArtifactError as exc:
        return [str(exc)]
    listed = {e.path: e for e in expected.files}
    present = {e.path: e for e in actual.files}
    problems = [f"missing {p}" for p in sorted(set(listed) - set(present))]
    problems += [f"extra {p}" for p in sorted(set(present) - set(listed))]
    problems += [f"changed {p}" for p in sorted(set(listed) & set(present)) if listed[p] != present[p]]
    return problems


def checkpoint_to_resume(run_path: Path, current: RunIdentity) -> Path:
    """The newest complete checkpoint, verified and of this very run; refused (exit 2) otherwise."""
    found = checkpoints(run_path)
    if not found:
        raise RunDirectoryError(f"{run_path}: no complete checkpoint to resume from")
    newest = found[-1]
    if problems := checkpoint_problems(newest):
        raise RunDirectoryError(
            f"{newest}: checkpoint failed verification ({'; '.join(problems)}); delete this directory to "
            "resume from the previous checkpoint, or start a new run")
    if differences := RunIdentity.read(newest).differences(current):
        raise RunDirectoryError(
            f"{newest}: cannot resume: this run differs from the checkpoint in its {'; '.join(differences)}. "
            "Resume with the original config, data and base model, or start a new run (another run.name).")
    log.info("resuming from %s (verified)", newest)
    return newest
