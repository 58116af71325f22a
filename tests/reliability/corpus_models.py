"""Hostile model references: missing paths, offline hub ids, broken GGUF files and model directories,
and names that are not packaged.

Every case is refused by `prepare-model`, or by `train` for a run config that names the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from .corpus_base import Case, _set, _train, _valid_config


def _model_cases() -> dict[str, Case]:
    def prepare(make_path: Callable[[Path], str]):
        def make(case_dir: Path) -> tuple[str, ...]:
            return ("prepare-model", make_path(case_dir))

        return make

    def garbage_gguf(case_dir: Path) -> str:
        (case_dir / "model.gguf").write_bytes(b"GGUF" + bytes(range(200)))
        return str(case_dir / "model.gguf")

    def empty_dir(case_dir: Path) -> str:
        (case_dir / "model").mkdir()
        return str(case_dir / "model")

    def bad_config_dir(case_dir: Path) -> str:
        (case_dir / "model").mkdir()
        (case_dir / "model" / "config.json").write_text("{broken")
        return str(case_dir / "model")

    def train_with(reference: str):
        def make(case_dir: Path) -> tuple[str, ...]:
            config = _set(_valid_config(), "model.name_or_path", reference)
            (case_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
            return _train(case_dir, case_dir / "run.yaml")

        return make

    return {
        "model_local_path_missing": (
            "no-such-model' is not a packaged model", prepare(lambda d: str(d / "no-such-model"))),
        "model_hub_id_offline": (
            "cannot download 'nobody-here/not-a-model-xyz' from the Hugging Face hub",
            prepare(lambda d: "nobody-here/not-a-model-xyz")),
        "model_garbage_gguf": ("not a loadable GGUF model", prepare(garbage_gguf)),
        "model_empty_directory": ("is a directory without config.json", prepare(empty_dir)),
        "model_broken_config_json": ("config.json: not a readable model config", prepare(bad_config_dir)),
        "model_reference_with_dotdot": (
            "'../../etc/passwd' is not a packaged model", prepare(lambda d: "../../etc/passwd")),
        "model_unknown_packaged_name": (
            "'smollm2-999b-instruct' is not a packaged model (smollm2-135m-instruct)",
            train_with("smollm2-999b-instruct")),
    }
