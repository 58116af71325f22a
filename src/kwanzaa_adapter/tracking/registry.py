"""MLflow: the run's tracking store, its parameters and artifact, and the model registry.

The Trainer's own `MLflowCallback` logs the step metrics into the run started here. After the
artifact passes verification it is logged to the run and registered as a model version tagged
with its manifest digest, base model and dataset digests; `pull_model_version` downloads a version
and verifies it against its manifest and against the digest the registry recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from kwanzaa_adapter.safety.artifacts import MANIFEST_NAME, Mismatch, VerificationReport, sha256_file, verify_artifact
from kwanzaa_adapter.safety.signing import require_trusted_signature

ARTIFACT_PATH = "final_artifact"  # where the artifact sits in the MLflow run
LOCAL_STORE = "mlflow.db"
LOCAL_ARTIFACTS = "mlartifacts"
MANIFEST_TAG = "manifest_sha256"


class RegistryError(Exception):
    """The registry or the requested model version cannot be reached (bad input: exit 2)."""


def tracking_uri(config, run_path: Path) -> str:
    """The configured tracking URI, or a SQLite store in the run directory."""
    return config.monitoring.mlflow.tracking_uri or f"sqlite:///{(run_path / LOCAL_STORE).resolve()}"


def _artifact_location(uri: str) -> str | None:
    """A SQLite store keeps its files beside it, not in ./mlruns of whatever directory we run from."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / LOCAL_ARTIFACTS).as_uri()
    return None  # a tracking server or remote store chooses


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def start_mlflow_run(config, run_path: Path, version: str):
    """Start the run the Trainer's MLflowCallback will log into; params are the resolved config, flattened."""
    import mlflow
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    uri = tracking_uri(config, run_path)
    mlflow.set_tracking_uri(uri)
    name = config.monitoring.mlflow.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        experiment_id = mlflow.create_experiment(name, artifact_location=_artifact_location(uri))
    else:
        experiment_id = experiment.experiment_id
    active = mlflow.start_run(experiment_id=experiment_id, run_name=f"{config.run.name}-v{version}",
                              tags={"kwanzaa.run_dir": str(run_path), "kwanzaa.artifact_version": version,
                                    "kwanzaa.config_sha256": config.digest()})
    params = {f"config.{k}": json.dumps(v) if isinstance(v, (list, type(None))) else v
              for k, v in flatten(config.to_dict()).items()}
    # The full config is in the artifact's training_config.yaml; overlong values are cut here only.
    mlflow.log_params({k: str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in params.items()})
    return active


def version_tags(artifact_dir: Path) -> dict[str, str]:
    """What a registered version is tagged with: manifest digest, base model, data and config digests."""
    metadata = json.loads((artifact_dir / "metadata.json").read_text())
    base = metadata["base_model"]
    tags = {
        MANIFEST_TAG: sha256_file(artifact_dir / MANIFEST_NAME)[0],
        "artifact_version": metadata["artifact_version"],
        "run_name": metadata["run_name"],
        "base_model": base["reference"],
        "base_model_digest": base["model_digest"],
        "config_sha256": metadata["config_sha256"],
    }
    for split, record in metadata["datasets"].items():
        tags[f"dataset.{split}.sha256"] = record["sha256"]
    return tags


def publish_artifact(config, artifact_dir: Path) -> dict:
    """Log the artifact to the active run and, when the registry is enabled, register it. Returns what was done."""
    import mlflow
    from mlflow import MlflowClient

    run = mlflow.active_run()
    published = {"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}
    if config.monitoring.mlflow.log_artifact or config.monitoring.registry.enabled:
        mlflow.log_artifacts(str(artifact_dir), ARTIFACT_PATH)
        published["artifact_uri"] = f"{run.info.artifact_uri}/{ARTIFACT_PATH}"
    if not config.monitoring.registry.enabled:
        return published
    client, name = MlflowClient(), config.monitoring.registry.model_name
    if client.search_registered_models(filter_string=f"name = '{name}'") == []:
        client.create_registered_model(name, description="kwanzaa-adapter LoRA adapters (verified artifacts)")
    # Registered from the run's artifact location: the artifact is not an MLflow "logged model".
    version = client.create_model_version(name, source=published["artifact_uri"], run_id=run.info.run_id,
                                          tags=version_tags(artifact_dir))
    published.update(registered_model=name, model_version=str(version.version))
    return published


def pull_model_version(name: str, version: str, out: Path, uri: str, trusted_keys: tuple = ()) -> VerificationReport:
    """Download a registered version into `out` and verify it; the registry's manifest digest must match too,
    and with trusted keys the signature must be one of theirs (SignatureError)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out}: exists and is not empty; choose a new directory")
    mlflow.set_tracking_uri(uri)
    try:
        record = MlflowClient().get_model_version(name, str(version))
        location = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                       dst_path=str(out))
    except MlflowException as exc:
        raise RegistryError(f"{uri}: cannot pull model '{name}' version {version}: "
                            f"{str(exc).splitlines()[0]}") from None
    require_trusted_signature(location, trusted_keys)
    report = verify_artifact(Path(location))
    expected = record.tags.get(MANIFEST_TAG)
    actual = sha256_file(Path(location) / MANIFEST_NAME)[0] if (Path(location) / MANIFEST_NAME).is_file() else None
    if report.ok and expected != actual:
        # Files and manifest agree with each other but not with what was registered: both were replaced.
        mismatch = Mismatch(f"{MANIFEST_NAME} (registry tag {MANIFEST_TAG})", expected or "(no tag)", actual, 0, 0)
        report = VerificationReport(report.directory, mismatched=(mismatch,))
    return report
