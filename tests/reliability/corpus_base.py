"""What every group of hostile cases shares: the repository's paths, `HostileCase`, and run-file helpers.

`_valid_config()` gives a self-contained valid run config; `_set` and `_drop` return edited copies of
it, and `_train` the `train` command line for a case directory. The groups live in corpus_configs.py,
corpus_data.py, corpus_artifacts.py and corpus_models.py; corpus.py gathers them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
TRAIN_RECORDS = REPO / "data" / "kwanzaa_train_records.jsonl"
EVAL_DATA = REPO / "data" / "kwanzaa_eval.jsonl"


@dataclass(frozen=True)
class HostileCase:
    name: str
    kind: str  # config | data | artifact | model
    argv: tuple[str, ...]
    reason: str  # a fragment of the message that must refuse it: refused for another reason is a failure
    expected_exit: int = 2

    def gives_reason(self, message: str) -> bool:
        """Whether `message` names this case's reason (whitespace runs count as one space)."""
        return " ".join(self.reason.split()) in " ".join(message.split())


# name -> (reason it must be refused, maker of its files returning the command line)
Case = tuple[str, Callable[[Path], tuple[str, ...]]]


def _valid_config() -> dict:
    """configs/demo.yaml with its profiles merged in and absolute data paths: a self-contained run file."""
    from kwanzaa_adapter.config import load_training_config

    config = load_training_config(DEMO_CONFIG).model_dump(mode="json")
    config["data"]["train_file"] = str(REPO / "data" / "kwanzaa_train.jsonl")
    config["data"]["eval_file"] = str(EVAL_DATA)
    return config


def _set(config: dict, dotted: str, value) -> dict:
    copy = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = copy
    for key in parents:
        node = node[key]
    node[leaf] = value
    return copy


def _drop(config: dict, dotted: str) -> dict:
    copy = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = copy
    for key in parents:
        node = node[key]
    del node[leaf]
    return copy


def _train(case_dir: Path, config_path: Path, *extra: str) -> tuple[str, ...]:
    return ("train", "--config", str(config_path), "--output-dir", str(case_dir / "out"), *extra)

