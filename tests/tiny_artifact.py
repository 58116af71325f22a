"""One tiny trained adapter artifact per test session, shared by the backend tests.

A session fixture imported into several test modules is still instantiated once per module, so the
artifact is cached on disk under the session's base temp directory: the first module trains it
(two steps of the real workflow on the tiny 4-bit Llama), the others find it there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import build_tiny_model, write_run_config
from kwanzaa_adapter.training.workflow import train_adapter

RECORDS = Path(__file__).resolve().parents[1] / "data" / "kwanzaa_eval_records.jsonl"


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path]:
    """(run config, published artifact) of a two-step tiny training run."""
    directory = tmp_path_factory.getbasetemp() / "backend-tiny-artifact"
    config = directory / "run.yaml"
    artifact = directory / "outputs" / "tiny" / "final_artifact"
    if not artifact.is_dir():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        write_run_config(directory, tiny_model_dir, train_rows=4, eval_rows=2,
                         training={"max_steps": 2, "per_device_batch_size": 2},
                         checkpointing={"save_steps": 2}, evaluation={"eval_steps": 2, "max_new_tokens": 12})
        assert train_adapter(config).artifact_dir == artifact
    return config, artifact


@pytest.fixture(scope="session")
def other_base_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama like the training base but with other random weights (another digest)."""
    directory = tmp_path_factory.getbasetemp() / "backend-other-base"
    if not (directory / "config.json").is_file():
        directory.mkdir(exist_ok=True)
        build_tiny_model("llama", len(tokenizer), seed=1).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def copy_artifact(artifact: Path, target: Path) -> Path:
    shutil.copytree(artifact, target)
    return target


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def write_records(path: Path, rows: int) -> Path:
    """The first `rows` held-out RAG records of the shipped eval split."""
    lines = RECORDS.read_text(encoding="utf-8").splitlines()[:rows]
    assert all(json.loads(line)["documents"] for line in lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
