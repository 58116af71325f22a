"""The proofs a report shows, each with its result: checked again where the files allow it, else read back
from what the run recorded (and said so)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kwanzaa_adapter.safety.artifacts import SIGNATURE_NAME, verify_artifact
from kwanzaa_adapter.safety.artifacts.safetensors_header import SafetensorsHeaderError, check_safetensors_header
from kwanzaa_adapter.safety.checksums import is_lora_tensor


@dataclass(frozen=True)
class Proof:
    name: str
    ok: bool | None  # None: cannot be told from the files at hand, or does not apply
    detail: str
    otherwise: str = "not shown"  # the result's word where ok is None


def base_weights_proof(metadata: dict, run_dir: Path | None) -> Proof:
    name = "base weights unchanged"
    recorded = metadata.get("base_model", {}).get("model_digest")
    baseline_path = run_dir / "baseline_checksums.json" if run_dir is not None else None
    if baseline_path is None or not baseline_path.is_file():
        return Proof(name, None, f"the run's baseline is not beside this artifact; the artifact records base digest "
                                 f"{recorded}")
    try:
        baseline = json.loads(baseline_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return Proof(name, False, f"{baseline_path}: unreadable: {exc}")
    if baseline.get("model_digest") != recorded:
        return Proof(name, False, f"the baseline's digest {baseline.get('model_digest')} is not the artifact's "
                                  f"recorded base digest {recorded}")
    return Proof(name, True, f"all {len(baseline.get('tensors', {}))} base tensors (4-bit data and quantization "
                             f"state included) were hashed before training and again after it, and matched: a "
                             f"difference stops the run before anything is published; model digest {recorded}")


def adapter_only_proof(artifact: Path, metadata: dict) -> Proof:
    name = "only adapter parameters trained"
    parameters = metadata.get("parameters", {})
    try:
        header = check_safetensors_header(artifact / "adapter_model.safetensors")
    except (OSError, SafetensorsHeaderError) as exc:
        return Proof(name, False, f"adapter_model.safetensors: {exc}")
    names = [key for key in header if key != "__metadata__"]
    other = [key for key in names if not is_lora_tensor(key)]
    if other:
        return Proof(name, False, f"the adapter file holds {len(other)} tensor(s) that are not LoRA: {other[:3]}")
    trainable, total = parameters.get("trainable"), parameters.get("total")
    share = f"; {trainable:,} of {total:,} parameters trainable ({parameters.get('percent', 0):.2f}%)" \
        if trainable is not None and total else ""
    return Proof(name, True, f"checked before training (every trainable parameter is LoRA) and now: the adapter "
                             f"file's {len(names)} tensors are all LoRA{share}")


def checksums_proof(artifact: Path) -> Proof:
    report = verify_artifact(artifact)
    return Proof("artifact checksums verified", report.ok, report.format().splitlines()[0] + " (checked now)")


def signature_proof(artifact: Path, metadata: dict) -> Proof:
    signing = metadata.get("signing")
    if not signing:
        return Proof("signature", None, "artifacts.signing was not set; `kwanzaa-adapter sign` can sign it later",
                     otherwise="not signed")
    present = (artifact / SIGNATURE_NAME).is_file()
    if not present:
        return Proof("signature", False, f"the run signed it, but {SIGNATURE_NAME} is missing")
    return Proof("signature", True, f"{SIGNATURE_NAME} over every file, by the key with fingerprint "
                                    f"sha256:{signing.get('public_key_sha256')} (checked against that key when the "
                                    "run published it; check it with the publisher's key: verify --public-key)")


def artifact_proofs(artifact: Path, metadata: dict, run_dir: Path | None) -> list[Proof]:
    return [base_weights_proof(metadata, run_dir), adapter_only_proof(artifact, metadata), checksums_proof(artifact),
            signature_proof(artifact, metadata)]


def cpu_class(metadata: dict) -> str:
    """The machine and precision a run trained with, in the words of our figures: GPU, or the CPU class
    (bf16 products measured against fp32 by the precision probe)."""
    hardware, precision = metadata.get("hardware", {}), metadata.get("precision") or {}
    if hardware.get("gpu"):
        return f"{hardware.get('gpu_count', 1)} x {hardware['gpu']}, {precision.get('resolved', 'n/a')}"
    rates = (precision.get("probe") or {}).get("gflops", {})
    cores = f"{hardware.get('cpu_count', '?')} cores"
    if "bfloat16" in rates and "float32" in rates:
        native = rates["bfloat16"] >= rates["float32"] / 4
        kind = "AVX512-BF16/AMX class (bf16 native)" if native else "AVX2 class (bf16 emulated)"
        figures = f"bf16 {rates['bfloat16']:.0f} vs fp32 {rates['float32']:.0f} GFLOP/s"
        return f"CPU, {cores}, {kind}: {figures}; trained in {precision.get('resolved', 'n/a')}"
    return f"{hardware.get('device', 'cpu')}, {cores}; trained in {precision.get('resolved', 'n/a')}"
