"""A corpus of hostile inputs: malformed configs, datasets, artifacts and model references.

`build_corpus(root)` writes each case's files under `root/<case name>/` and returns the command
line that must refuse it: exit 1 (a failed verification) or 2 (bad input), one clear message that
gives the case's own reason (`HostileCase.reason`, a fragment of it), no traceback, no hang, and
nothing written. Used by tests/reliability/test_hostile_inputs.py (in
process) and by bench/reliability.py (one subprocess per case, time-boxed).

The cases of each kind live in corpus_configs.py, corpus_data.py, corpus_artifacts.py and
corpus_models.py, on the shared helpers of corpus_base.py; this module gathers them.
"""

from __future__ import annotations

from pathlib import Path

from .corpus_artifacts import _artifact_cases, _sealed_artifact  # noqa: F401 - signatures.py imports it from here
from .corpus_base import (  # noqa: F401 - the tests and signatures.py import these from here
    EVAL_DATA,
    TRAIN_RECORDS,
    HostileCase,
    _valid_config,
)
from .corpus_configs import _config_cases
from .corpus_data import _data_cases
from .corpus_models import _model_cases


def build_corpus(root: Path) -> list[HostileCase]:
    """Write every case under `root` and return them; case names are unique directory names."""
    valid = _valid_config()
    groups = {"config": _config_cases(valid), "data": _data_cases(), "artifact": _artifact_cases(),
              "model": _model_cases()}
    cases = []
    for kind, makers in groups.items():
        for name, (reason, make) in makers.items():
            case_dir = root / name
            case_dir.mkdir(parents=True)
            argv = make(case_dir)
            cases.append(HostileCase(name, kind, argv, reason, 1 if kind == "artifact" else 2))
    return cases


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Relative path -> (size, mtime_ns) of everything under `directory`, links not followed."""
    state = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        state[str(path.relative_to(directory))] = (info.st_size, info.st_mtime_ns)
    return state
