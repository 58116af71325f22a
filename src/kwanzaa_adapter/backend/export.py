"""`export --adapter A --merge OUT`: the adapter merged into the de-quantized base, proven by logits.

The base model is loaded as training loaded it (4-bit where configured, in the precision it was
trained in) and must have the digest the artifact records; the verified adapter is applied to it:
the model as trained. Its merge is the fast engine's (`modeling.derived.write_merged`): each 4-bit
weight de-quantized to float32 as training's forward pass de-quantizes it, plus PEFT's own LoRA delta.
The merged model is saved as safetensors with the tokenizer and chat template, reloaded from disk, and
its logits on sample prompts are compared with both: the model as trained (which proves the merged
model is the trained one) and its base de-quantized to float32 with the adapter applied again, unmerged
(which isolates the merge from the de-quantization). Each comparison
has its own tolerance; the figures go into `logit_check.json`. The directory is sealed with
`checksums.json` and written atomically, so a failed check leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kwanzaa_adapter.backend.models.causal_lm import (
    VerifiedArtifact,
    check_base_digest,
    load_base_as_trained,
    verify_adapter_artifact,
)
from kwanzaa_adapter.config import KwanzaaConfig, config_from_yaml_text
from kwanzaa_adapter.data.records import Document, RagRecord, render_record
from kwanzaa_adapter.modeling.derived import write_merged
from kwanzaa_adapter.modeling.loading import load_verified_adapter, resolve_device, run_precision, set_compute_precision
from kwanzaa_adapter.safety.artifacts import atomic_directory, seal_artifact, verify_artifact

# Merged vs the de-quantized base + adapter, max |logit difference|: the same float32 weights,
# merging only reorders the sums.
DEFAULT_TOLERANCE = 1e-3
# Merged vs the model as trained: the 4-bit kernels de-quantize each weight in float32 as they
# multiply (the model as trained computes in float32 here, as the merged one does), while the
# export de-quantizes as training's forward pass did, into the dtype the base was loaded in, then
# casts to float32. Loaded in float32 these are the same weights: the logits agreed exactly (0.0)
# on the tiny test model and on SmolLM2-135M. Loaded in bf16 each weight is rounded once (relative
# spacing eps = 2^-7), and the logits move by a multiple of eps times their size that grows with
# depth: 0.4 eps of the largest |logit| on the 2-layer tiny model (2.1e-3 at 0.81), 2.4 eps on the
# 30-layer SmolLM2-135M (0.79 at 42). Six eps allows 2.5 times that and still fails a wrong
# adapter weight: zeroing one q_proj's LoRA B (of 70) moved SmolLM2's logits by 15.7 eps (5.1),
# the whole adapter by about 100 eps (32). Never tighter than the float32 merge tolerance.
AS_TRAINED_EPS = 6
CHECK_FILE = "logit_check.json"
EXPORT_RECORD = "kwanzaa_export.json"
EXPORT_REQUIRED = ("config.json", "checksums.json", CHECK_FILE, EXPORT_RECORD)

_NGUZO_SABA = Document(
    title="Nguzo Saba", source="kwanzaa-adapter sample",
    text="Kwanzaa is organized around seven principles, the Nguzo Saba: umoja (unity), kujichagulia "
         "(self-determination), ujima (collective work and responsibility), ujamaa (cooperative economics), "
         "nia (purpose), kuumba (creativity) and imani (faith).",
)
_DATES = Document(
    title="The week of Kwanzaa", source="kwanzaa-adapter sample",
    text="Kwanzaa is celebrated from December 26 to January 1. Each day a candle of the kinara is lit.",
)
SAMPLE_RECORDS = (
    RagRecord(id="sample-1", question="When is Kwanzaa celebrated?", documents=[_DATES, _NGUZO_SABA],
              expect_refusal=False),
    RagRecord(id="sample-2", question="What does ujima mean?", documents=[_NGUZO_SABA], expect_refusal=False),
    RagRecord(id="sample-3", question="Who designed the first kinara?", documents=[_DATES], expect_refusal=True),
)


class MergeCheckError(Exception):
    """The merged model's logits differ from the trained model beyond a tolerance (exit 1)."""

    def __init__(self, message: str, check: LogitCheck | None = None):
        super().__init__(message)
        self.check = check


@dataclass(frozen=True)
class Comparison:
    """Merged model (reloaded from disk) vs one reference model: the largest |logit difference|."""

    reference: str
    max_abs_diff: float
    tolerance: float
    tolerance_rule: str

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"merged vs {self.reference}: max |diff| {self.max_abs_diff:.3e}, tolerance {self.tolerance:.3e} "
                f"({self.tolerance_rule}): {verdict}")


@dataclass(frozen=True)
class LogitCheck:
    """The merged model against the model as trained and against the de-quantized base + adapter."""

    prompts: int
    positions: int
    max_abs_logit: float
    as_trained: Comparison
    dequantized: Comparison

    @property
    def passed(self) -> bool:
        return self.as_trained.passed and self.dequantized.passed

    def as_json(self) -> dict:
        return {"prompts": self.prompts, "positions": self.positions, "max_abs_logit": self.max_abs_logit,
                "as_trained": self.as_trained.as_json(), "dequantized": self.dequantized.as_json(),
                "passed": self.passed}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"logit check {verdict} over {self.positions} positions of {self.prompts} sample prompts "
                f"(largest |logit| {self.max_abs_logit:.2f}):\n"
                f"  {self.as_trained.summary()}\n  {self.dequantized.summary()}")


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    check: LogitCheck


@dataclass(frozen=True)
class TrainedBase:
    """What the export records and reuses of the base as training loaded it."""

    tokenizer: object
    precision: str  # the dtype the base was loaded in for training
    loaded_as: str  # e.g. "4-bit nf4 (bfloat16)"
    provenance: dict


def export_merged(adapter: str | Path, out: str | Path, config: KwanzaaConfig | None = None, *,
                  tolerance: float | None = None, as_trained_tolerance: float | None = None,
                  allow_base_mismatch: bool = False, trusted_keys: tuple = ()) -> ExportResult:
    """Merge the verified adapter into its de-quantized base and write the checked model to `out`.

    `config` defaults to the artifact's own training_config.yaml (the base model it was trained on);
    `tolerance` (merged vs de-quantized base + adapter) to DEFAULT_TOLERANCE; `as_trained_tolerance`
    (merged vs the model as trained) to the rule of AS_TRAINED_EPS.
    """
    adapter, out = Path(adapter), Path(out)
    verified, config = verified_with_config(adapter, config, trusted_keys)
    with atomic_directory(out) as staging:  # refuses an existing `out` before any model loads
        device = resolve_device(config.training.device)
        model, trained = load_as_trained(config, verified, device, allow_base_mismatch)
        prompts = sample_prompt_ids(trained.tokenizer, config, device)
        as_trained = [logits(model, ids) for ids in prompts]
        save_merged(model, trained.tokenizer, staging)  # from the model as trained, which it leaves as it is
        model = dequantized_with_adapter(model, config, verified)
        dequantized = [logits(model, ids) for ids in prompts]
        del model
        reloaded = reload(staging, device)
        merged = [logits(reloaded, ids) for ids in prompts]
        check = check_logits(merged, as_trained, dequantized, config, trained, tolerance, as_trained_tolerance)
        if not check.passed:
            raise MergeCheckError(f"{check.summary()}\nnothing was written to {out}", check)
        write_json(staging / CHECK_FILE, check.as_json())
        write_json(staging / EXPORT_RECORD, trained.provenance)
        seal_artifact(staging)
    report = verify_artifact(out, required_files=EXPORT_REQUIRED)
    if not report.ok:
        raise MergeCheckError(f"the exported model failed verification:\n{report.format()}")
    return ExportResult(out, check)


def verified_with_config(adapter: Path, config: KwanzaaConfig | None, trusted_keys: tuple
                         ) -> tuple[VerifiedArtifact, KwanzaaConfig]:
    """The artifact verified (with the caller's trusted keys), then the config: the caller's, or the
    artifact's own training_config.yaml (the base model it was trained on)."""
    # Trusted keys come from the caller and the caller's config, never from the artifact's own config.
    trusted = (*trusted_keys, *(config.artifacts.trusted_keys if config else ()))
    verified = verify_adapter_artifact(adapter, trusted)
    if config is None:
        config = config_from_yaml_text((adapter / "training_config.yaml").read_text(encoding="utf-8"),
                                       str(adapter / "training_config.yaml"))
    return verified, config


def load_as_trained(config: KwanzaaConfig, verified: VerifiedArtifact, device: str,
                    allow_base_mismatch: bool):
    """(model, TrainedBase): the base loaded as training loaded it (the backend's loader; digest
    checked) with the verified adapter, computing in float32."""
    precision = verified.trained_precision or run_precision(config, device).resolved
    base, tokenizer, source, digest = load_base_as_trained(config, device, precision)
    adapter_info = check_base_digest(verified, digest, allow_base_mismatch)
    model = load_verified_adapter(base, verified.path, verified.trusted_keys).eval()
    # Computing in float32, as the merged model does: bf16/fp16 -> fp32 is exact, and the comparison
    # then measures what de-quantizing and merging changed, not the rounding of the activations.
    set_compute_precision(model, torch.float32)
    q = config.quantization
    loaded_as = f"4-bit {q.quant_type} ({precision})" if q.load_in_4bit else precision
    provenance = {
        "format": "kwanzaa-adapter.merged.v1", "dtype": "float32",
        "base_model": {**source.identity, "model_digest": digest, "loaded_as": loaded_as,
                       "dequantized_from": f"4-bit {q.quant_type}" if q.load_in_4bit else None},
        "adapter": adapter_info.as_json(),
    }
    return model, TrainedBase(tokenizer, precision, loaded_as, provenance)


def dequantized_with_adapter(model, config: KwanzaaConfig, verified: VerifiedArtifact):
    """The trained model's own base, de-quantized to float32 in place, with the verified adapter applied
    again (unmerged)."""
    base = model.unload()  # the LoRA layers removed
    if config.quantization.load_in_4bit:
        base = base.dequantize(dtype=torch.float32)
    return load_verified_adapter(base.to(torch.float32), verified.path, verified.trusted_keys).eval()


def as_trained_tolerance_for(config: KwanzaaConfig, precision: str, largest_logit: float) -> tuple[float, str]:
    """(tolerance, its rule) for merged vs the model as trained: see AS_TRAINED_EPS."""
    if not config.quantization.load_in_4bit:
        return DEFAULT_TOLERANCE, "float32 merge reordering; nothing de-quantized"
    eps = torch.finfo(getattr(torch, precision)).eps
    tolerance = max(DEFAULT_TOLERANCE, AS_TRAINED_EPS * eps * largest_logit)
    return tolerance, f"{AS_TRAINED_EPS} {precision} eps of the largest |logit|, at least {DEFAULT_TOLERANCE:.0e}"


def check_logits(merged: list[torch.Tensor], as_trained: list[torch.Tensor], dequantized: list[torch.Tensor],
                 config: KwanzaaConfig, trained: TrainedBase, tolerance: float | None,
                 as_trained_tolerance: float | None) -> LogitCheck:
    """The merged model's logits against both references, each with its tolerance (given, or the rule)."""
    largest = max(float(r.abs().max()) for r in as_trained)
    if as_trained_tolerance is None:
        as_trained_tolerance, as_trained_rule = as_trained_tolerance_for(config, trained.precision, largest)
    else:
        as_trained_rule = "given"
    dequantized_rule = "float32 merge reordering" if tolerance is None else "given"
    return LogitCheck(
        prompts=len(merged), positions=sum(m.shape[1] for m in merged), max_abs_logit=largest,
        as_trained=compare_logits(merged, as_trained, f"{trained.loaded_as} base + adapter as trained",
                                  as_trained_tolerance, as_trained_rule),
        dequantized=compare_logits(merged, dequantized, "de-quantized float32 base + adapter",
                                   DEFAULT_TOLERANCE if tolerance is None else tolerance, dequantized_rule),
    )


def save_merged(adapted, tokenizer, directory: Path) -> None:
    """The merged float32 weights (`modeling.derived.write_merged`, the fast engine's merge too), saved as
    safetensors with the tokenizer and its chat template, readable by everyone."""
    write_merged(adapted, tokenizer, directory)
    for path in directory.iterdir():
        path.chmod(0o644)  # safetensors writes weights private; the export is for everyone to read


def sample_prompt_ids(tokenizer, config: KwanzaaConfig, device: str) -> list[torch.Tensor]:
    """The sample records rendered as training renders them, with the answer prompt appended."""
    prompts = []
    for record in SAMPLE_RECORDS:
        encoded = tokenizer.apply_chat_template(render_record(record, config.data.system_prompt),
                                                add_generation_prompt=True, tokenize=True)
        prompts.append(torch.tensor([list(encoded["input_ids"])], device=device))
    return prompts


@torch.inference_mode()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float().cpu()


def reload(directory: Path, device: str):
    """The saved merged model, loaded back from disk as a user would load it."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map={"": device}).eval()


def compare_logits(actual: list[torch.Tensor], reference: list[torch.Tensor], name: str, tolerance: float,
                   rule: str) -> Comparison:
    diff = max(float((a - r).abs().max()) for a, r in zip(actual, reference))
    return Comparison(reference=name, max_abs_diff=diff, tolerance=tolerance, tolerance_rule=rule)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
