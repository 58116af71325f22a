"""`export --adapter A --merge OUT`: the adapter merged into the de-quantized base, proven by logits.

The base model is loaded as training loaded it (4-bit where configured) and must have the digest
the artifact records; it is then de-quantized to float32, the verified adapter is applied, and
PEFT's `merge_and_unload` folds it into the weights. The merged model is saved as safetensors with
the tokenizer and chat template, reloaded from disk, and its logits on sample prompts are compared
with those of the unmerged base+adapter (same de-quantized float32 base). The check's figures go
into `logit_check.json`; the directory is sealed with `checksums.json` and written atomically, so
a failed check leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kwanzaa_adapter.artifacts import atomic_directory, seal_artifact, verify_artifact
from kwanzaa_adapter.config import KwanzaaConfig, config_from_yaml_text
from kwanzaa_adapter.data.records import Document, RagRecord, render_record
from kwanzaa_adapter.modeling import load_verified_adapter, resolve_device
from kwanzaa_adapter.models.causal_lm import (
    VerifiedArtifact,
    check_base_digest,
    load_base_as_trained,
    verify_adapter_artifact,
)

DEFAULT_TOLERANCE = 1e-3  # max |logit difference| in float32; merging only reorders the sums
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
    """The merged model's logits differ from base+adapter beyond the tolerance (exit 1)."""


@dataclass(frozen=True)
class LogitCheck:
    """Merged model (reloaded from disk) vs the unmerged base+adapter, on the sample prompts."""

    prompts: int
    positions: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    reference: str = "unmerged adapter on the same de-quantized float32 base"

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def as_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (f"logit check {verdict}: max |merged - base+adapter| = {self.max_abs_diff:.3e} "
                f"(tolerance {self.tolerance:.0e}; largest |logit| {self.max_abs_logit:.2f}) "
                f"over {self.positions} positions of {self.prompts} sample prompts")


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    check: LogitCheck


def export_merged(adapter: str | Path, out: str | Path, config: KwanzaaConfig | None = None, *,
                  tolerance: float | None = None, allow_base_mismatch: bool = False) -> ExportResult:
    """Merge the verified adapter into its de-quantized base and write the checked model to `out`.

    `config` defaults to the artifact's own training_config.yaml (the base model it was trained on);
    `tolerance` to DEFAULT_TOLERANCE.
    """
    adapter, out = Path(adapter), Path(out)
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    verified = verify_adapter_artifact(adapter)
    if config is None:
        config = config_from_yaml_text((adapter / "training_config.yaml").read_text(encoding="utf-8"),
                                       str(adapter / "training_config.yaml"))
    with atomic_directory(out) as staging:  # refuses an existing `out` before any model loads
        device = resolve_device(config.training.device)
        adapted, tokenizer, provenance = load_dequantized_with_adapter(config, verified, device, allow_base_mismatch)
        prompts = sample_prompt_ids(tokenizer, config, device)
        reference = [logits(adapted, ids) for ids in prompts]
        save_merged(adapted, tokenizer, staging)
        del adapted
        reloaded = reload(staging, device)
        check = compare_logits(reference, [logits(reloaded, ids) for ids in prompts], tolerance)
        if not check.passed:
            raise MergeCheckError(f"{check.summary()}; nothing was written to {out}")
        _write_json(staging / CHECK_FILE, check.as_json())
        _write_json(staging / EXPORT_RECORD, provenance)
        seal_artifact(staging)
    report = verify_artifact(out, required_files=EXPORT_REQUIRED)
    if not report.ok:
        raise MergeCheckError(f"the exported model failed verification:\n{report.format()}")
    return ExportResult(out, check)


def load_dequantized_with_adapter(config: KwanzaaConfig, verified: VerifiedArtifact, device: str,
                                  allow_base_mismatch: bool):
    """The base as trained (digest checked), de-quantized to float32, with the verified adapter unmerged."""
    base, tokenizer, source, digest = load_base_as_trained(config, device)
    adapter_info = check_base_digest(verified, digest, allow_base_mismatch)
    if config.quantization.load_in_4bit:
        base = base.dequantize(dtype=torch.float32)
    adapted = load_verified_adapter(base.to(torch.float32), verified.path).eval()
    q = config.quantization
    provenance = {
        "format": "kwanzaa-adapter.merged.v1", "dtype": "float32",
        "base_model": {**source.identity, "model_digest": digest,
                       "dequantized_from": f"4-bit {q.quant_type}" if q.load_in_4bit else None},
        "adapter": adapter_info.as_json(),
    }
    return adapted, tokenizer, provenance


def save_merged(adapted, tokenizer, directory: Path) -> None:
    """PEFT's merge_and_unload, saved as safetensors with the tokenizer and its chat template."""
    merged = adapted.merge_and_unload()
    merged.config.use_cache = True  # an inference model; training switched the cache off
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
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


def compare_logits(reference: list[torch.Tensor], actual: list[torch.Tensor], tolerance: float) -> LogitCheck:
    diff = max(float((a - r).abs().max()) for r, a in zip(reference, actual))
    largest = max(float(r.abs().max()) for r in reference)
    positions = sum(r.shape[1] for r in reference)
    return LogitCheck(prompts=len(reference), positions=positions, max_abs_diff=diff, max_abs_logit=largest,
                      tolerance=tolerance)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
