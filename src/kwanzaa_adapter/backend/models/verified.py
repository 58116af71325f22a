"""The adapter checks the backend makes before an adapter answers: its artifact verified (signature with trusted
keys, checksums), then loaded only onto the base model it was trained on (the base digest computed as training
computed it)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.modeling.loading import AdapterVerificationError, load_base_model, prepare_quantized_base
from kwanzaa_adapter.modeling.precision import PRECISIONS
from kwanzaa_adapter.safety.artifacts import ArtifactError, verify_artifact
from kwanzaa_adapter.safety.checksums import compute_model_state_checksum
from kwanzaa_adapter.safety.signing import require_trusted_signature


class BaseModelMismatchError(AdapterVerificationError):
    """The loaded base model is not the one the adapter was trained on (exit 1)."""


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact that passed `verify`, with its metadata (read only after that)."""

    path: Path
    metadata: dict
    report: str
    trusted_keys: tuple = ()  # the keys its signature was checked against; checked again at load
    digests: dict = field(default_factory=dict)  # sha256 of each verified file: the gate and selector are read by them

    @property
    def trained_base_digest(self) -> str:
        return self.metadata["base_model"]["model_digest"]

    @property
    def trained_precision(self) -> str | None:
        """The dtype the base model was loaded in for training (artifacts before model.precision: None)."""
        recorded = self.metadata.get("precision")
        resolved = recorded.get("resolved") if isinstance(recorded, dict) else None
        return resolved if resolved in PRECISIONS else None


def verify_adapter_artifact(artifact: str | Path, trusted_keys: Sequence[str | Path] = ()) -> VerifiedArtifact:
    """Verify the signature (with trusted keys; SignatureError) and the checksums (AdapterVerificationError
    with the diff), then read the metadata."""
    artifact = Path(artifact)
    require_trusted_signature(artifact, trusted_keys)
    report = verify_artifact(artifact)
    if not report.ok:
        raise AdapterVerificationError(f"refusing to load the adapter in {artifact}:\n{report.format()}")
    metadata = json.loads((artifact / "metadata.json").read_text(encoding="utf-8"))
    digest = metadata.get("base_model", {}).get("model_digest") if isinstance(metadata, dict) else None
    if not isinstance(digest, str):
        raise ArtifactError(f"{artifact / 'metadata.json'}: base_model.model_digest is missing; "
                            "the artifact was not made by `kwanzaa-adapter train`")
    return VerifiedArtifact(artifact, metadata, report.format(), tuple(trusted_keys), dict(report.digests))


def base_digest_as_trained(model, config: KwanzaaConfig) -> str:
    """The base model's digest as training recorded it in the artifact (`base_model.model_digest`).

    Training takes its baseline after k-bit preparation, which may cast the unquantized fp16/bf16
    parameters (norms, embeddings) to fp32; the same preparation is applied here, and it also gives
    the adapter the numerics it was trained with.
    """
    if config.quantization.load_in_4bit:
        prepare_quantized_base(model, config, gradient_checkpointing=False)
    return compute_model_state_checksum(model)["model_digest"]


def load_base_as_trained(config: KwanzaaConfig, device: str, precision: str):
    """(model, tokenizer, source, digest): the base model loaded in `precision`, prepared and digested as
    training did."""
    model, tokenizer, source = load_base_model(config, device, precision)
    return model, tokenizer, source, base_digest_as_trained(model, config)


@dataclass(frozen=True)
class AdapterInfo:
    """What was loaded and what was checked, for /healthz and logs."""

    path: str
    version: str | None
    run_name: str | None
    verification: str
    trained_base_digest: str
    base_digest_matches: bool

    def as_json(self) -> dict:
        return {"path": self.path, "version": self.version, "run_name": self.run_name, "verified": True,
                "verification": self.verification, "trained_base_digest": self.trained_base_digest,
                "base_digest_matches": self.base_digest_matches}


def check_base_digest(artifact: VerifiedArtifact, loaded_digest: str, allow_mismatch: bool) -> AdapterInfo:
    """Refuse an adapter trained on another base model unless `allow_mismatch`."""
    expected, metadata = artifact.trained_base_digest, artifact.metadata
    if expected != loaded_digest and not allow_mismatch:
        reference = metadata["base_model"].get("reference", "?")
        raise BaseModelMismatchError(
            f"the adapter in {artifact.path} was trained on base model '{reference}' with digest {expected}, "
            f"but the loaded base model has digest {loaded_digest}: point model.name_or_path at the "
            "training base model (see the artifact's training_config.yaml), or pass --allow-base-mismatch "
            "to load it anyway"
        )
    return AdapterInfo(
        path=str(artifact.path), version=metadata.get("artifact_version"), run_name=metadata.get("run_name"),
        verification=artifact.report, trained_base_digest=expected, base_digest_matches=expected == loaded_digest,
    )
