"""MLflow model registry round trip on a real local store: register, pull, verify, detect tampering."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network from the tests
os.environ.setdefault("DO_NOT_TRACK", "true")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from kwanzaa_adapter.cli import main  # noqa: E402
from kwanzaa_adapter.safety.artifacts import seal_artifact  # noqa: E402
from kwanzaa_adapter.training.workflow import train_adapter  # noqa: E402

NAME = "kwanzaa-registry-test"


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_model_dir):
    """A tiny run registered in a store outside its run directory (a configured tracking URI)."""
    from conftest import write_run_config

    directory = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{directory / 'store' / 'mlflow.db'}"
    (directory / "store").mkdir()
    config = write_run_config(directory, tiny_model_dir, training={"max_steps": 2},
                              monitoring={"report_to": ["mlflow"], "mlflow": {"tracking_uri": uri},
                                          "registry": {"enabled": True, "model_name": NAME}})
    result = train_adapter(config)
    return result, uri


def _stored_copy(result) -> Path:
    """The registry's copy of the artifact, in the store's artifact directory."""
    return Path(result.published["artifact_uri"].removeprefix("file://"))


def test_registered_version_pulls_back_byte_identical_and_verified(registered, tmp_path, capsys):
    result, uri = registered
    assert result.published["model_version"] == "1"
    store = Path(uri.removeprefix("sqlite:///")).parent
    assert _stored_copy(result).is_relative_to(store / "mlartifacts")  # beside the configured store
    out = tmp_path / "pulled"
    assert main(["registry", "pull", NAME, "1", str(out), "--tracking-uri", uri]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    pulled = {p.name: p.read_bytes() for p in out.iterdir()}
    assert pulled == {p.name: p.read_bytes() for p in result.artifact_dir.iterdir()}


def test_flipped_byte_in_the_stored_copy_is_reported_with_its_path(registered, tmp_path, capsys):
    result, uri = registered
    stored = _stored_copy(result) / "adapter_model.safetensors"
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 0x01]))
        assert main(["registry", "pull", NAME, "1", str(tmp_path / "pulled"), "--tracking-uri", uri]) == 1
    finally:
        stored.write_bytes(original)
    out = capsys.readouterr().out
    assert "mismatched  adapter_model.safetensors" in out


def test_resealed_replacement_is_caught_by_the_registered_manifest_digest(registered, tmp_path, capsys):
    result, uri = registered
    stored = _stored_copy(result)
    backup = tmp_path / "backup"
    shutil.copytree(stored, backup)
    try:
        metadata = json.loads((stored / "metadata.json").read_text())
        metadata["final_metrics"]["eval_loss"] = 0.0  # a better-looking artifact...
        (stored / "metadata.json").write_text(json.dumps(metadata))
        seal_artifact(stored)  # ...with a manifest that matches it
        assert main(["registry", "pull", NAME, "1", str(tmp_path / "pulled"), "--tracking-uri", uri]) == 1
    finally:
        shutil.rmtree(stored)
        shutil.copytree(backup, stored)
    assert "checksums.json (registry tag manifest_sha256)" in capsys.readouterr().out


def test_unknown_version_exits_2_with_one_message(registered, tmp_path, capsys):
    _, uri = registered
    assert main(["registry", "pull", NAME, "7", str(tmp_path / "pulled"), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"cannot pull model '{NAME}' version 7" in err and "Traceback" not in err


def test_pull_refuses_a_non_empty_directory_and_a_missing_uri(registered, tmp_path, capsys, monkeypatch):
    _, uri = registered
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["registry", "pull", NAME, "1", str(tmp_path / "busy"), "--tracking-uri", uri]) == 2
    assert "is not empty" in capsys.readouterr().err
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["registry", "pull", NAME, "1", str(tmp_path / "new")]) == 2
    assert "--tracking-uri" in capsys.readouterr().err
