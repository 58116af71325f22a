"""Metrics in every enabled backend (TensorBoard, MLflow local store, W&B offline), pre-flight checks, plots."""

from __future__ import annotations

import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no network from the tests
os.environ.setdefault("DO_NOT_TRACK", "true")

import json  # noqa: E402

import pytest  # noqa: E402

from kwanzaa_adapter.cli import main  # noqa: E402
from kwanzaa_adapter.tracking import monitoring  # noqa: E402
from kwanzaa_adapter.tracking.registry import MANIFEST_TAG  # noqa: E402
from kwanzaa_adapter.training.publishing import CURVES_FILE  # noqa: E402
from kwanzaa_adapter.training.workflow import train_adapter  # noqa: E402

STEP_METRICS = {"loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss", "eval_perplexity"}
BEHAVIOR = {f"behavior/{model}/{metric}" for model in ("base", "adapter")
            for metric in ("json_validity_rate", "citation_rate", "refusal_correctness_rate")}


@pytest.fixture(scope="module")
def monitored(tmp_path_factory, tiny_model_dir):
    """One tiny run reporting to all three backends, with behavioral metrics and the registry on."""
    from conftest import write_run_config

    directory = tmp_path_factory.mktemp("monitored")
    config = write_run_config(
        directory, tiny_model_dir, evaluation={"behavioral": True},
        monitoring={"report_to": ["tensorboard", "mlflow", "wandb"], "registry": {"enabled": True,
                                                                                   "model_name": "kwanzaa-tiny"}})
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    patch.setenv("WANDB_SILENT", "true")
    try:
        result = train_adapter(config)
    finally:
        patch.undo()
    return result


def _tensorboard_scalars(run_dir) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


def test_tensorboard_records_step_and_behavioral_metrics(monitored):
    scalars = _tensorboard_scalars(monitored.run_dir)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
            "eval/loss", "eval/perplexity"} <= set(scalars)
    assert len(scalars["train/loss"]) == 4
    assert BEHAVIOR <= set(scalars)


def test_mlflow_run_holds_params_metrics_and_the_artifact(monitored):
    from mlflow import MlflowClient

    published = monitored.published
    assert published["tracking_uri"] == f"sqlite:///{(monitored.run_dir / 'mlflow.db').resolve()}"
    client = MlflowClient(published["tracking_uri"])
    run = client.get_run(published["run_id"])
    assert run.info.status == "FINISHED"
    assert STEP_METRICS | BEHAVIOR <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.params["config.training.learning_rate"] == "0.01"
    assert run.data.params["config.adapter.target_modules"].startswith('["q_proj"')
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "final_artifact")}
    expected = {f"final_artifact/{p.name}" for p in monitored.artifact_dir.iterdir()}
    assert logged == expected
    assert (monitored.run_dir / "mlartifacts").is_dir() and not (monitored.run_dir / "mlruns").exists()


def test_registry_version_is_tagged_with_manifest_base_and_data_digests(monitored):
    from mlflow import MlflowClient

    from kwanzaa_adapter.safety.artifacts import sha256_file

    client = MlflowClient(monitored.published["tracking_uri"])
    version = client.get_model_version("kwanzaa-tiny", monitored.published["model_version"])
    metadata = json.loads((monitored.artifact_dir / "metadata.json").read_text())
    assert str(version.version) == "1" and version.run_id == monitored.published["run_id"]
    assert version.tags[MANIFEST_TAG] == sha256_file(monitored.artifact_dir / "checksums.json")[0]
    assert version.tags["base_model_digest"] == metadata["base_model"]["model_digest"]
    assert version.tags["dataset.train.sha256"] == metadata["datasets"]["train"]["sha256"]
    assert version.tags["dataset.eval.sha256"] == metadata["datasets"]["eval"]["sha256"]
    assert version.tags["artifact_version"] == "0.1.0"


def test_wandb_offline_run_is_a_local_directory_with_the_metrics(monitored):
    runs = list((monitored.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (records,) = runs[0].glob("run-*.wandb")
    data = records.read_bytes()
    for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                "eval/loss", "eval/perplexity", "behavior/adapter/json_validity_rate", "artifact/manifest_sha256"):
        assert key.encode() in data, key


def test_training_curves_are_in_the_run_directory_and_the_card(monitored):
    picture = monitored.run_dir / CURVES_FILE
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.read_bytes() == (monitored.artifact_dir / CURVES_FILE).read_bytes()
    assert f"![Training curves]({CURVES_FILE})" in (monitored.artifact_dir / "README.md").read_text()


def test_missing_backend_package_exits_2_before_writing(tiny_run_config, tmp_path, capsys, monkeypatch):
    # As if the mlflow extra were not installed: its module is looked up under a name that does not exist.
    monkeypatch.setitem(monitoring.BACKEND_REQUIREMENTS, "mlflow", ("kwanzaa_no_such_module", "mlflow"))
    config = tiny_run_config(monitoring={"report_to": ["tensorboard", "mlflow"]})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "monitoring.report_to: 'mlflow' needs" in err and "kwanzaa-adapter[mlflow]" in err
    assert "Traceback" not in err and not (tmp_path / "outputs").exists()


def test_wandb_online_without_login_exits_2_before_writing(tiny_run_config, tmp_path, capsys, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    config = tiny_run_config(monitoring={"report_to": ["wandb"]})
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "no W&B login" in err and "wandb login" in err and "offline" in err
    assert not (tmp_path / "outputs").exists()


def test_registry_without_mlflow_is_a_config_error_naming_the_key(tiny_run_config, tmp_path, capsys):
    config = tiny_run_config(monitoring={"report_to": ["tensorboard"], "registry": {"enabled": True}})
    assert main(["train", "--config", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "monitoring.registry: enabled needs 'mlflow' in monitoring.report_to" in err
    assert not (tmp_path / "outputs").exists()


def test_unknown_backend_is_rejected_with_its_key_path(tiny_run_config, capsys):
    config = tiny_run_config(monitoring={"report_to": ["tensorboard", "comet"]})
    assert main(["train", "--config", str(config)]) == 2
    assert "monitoring.report_to.1:" in capsys.readouterr().err


def test_training_curves_show_all_four_series(tmp_path):
    history = [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4 * s, "grad_norm": 1.0 + s,
                "eval_loss": 1.5 / s if s % 2 == 0 else None} for s in range(1, 7)]
    path = monitoring.plot_training_curves(history, tmp_path / "curves.png", title="t")
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 2 * height  # three panels side by side
