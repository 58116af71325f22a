"""`export --adapter A --merge OUT --format gguf [--quant q8_0|bf16|f16]`: the adapter as a GGUF for llama.cpp.

The same road as the safetensors export and the fast engine: the artifact verified (checksums,
signature with trusted keys), the base loaded as trained with its digest checked, then the
de-quantized base + LoRA delta (`modeling.derived.write_merged`) converted by llama.cpp's own
`convert_hf_to_gguf.py`. llama.cpp then loads the file it wrote, and its logits on the sample
prompts are compared with the model as trained (4-bit base + adapter, computing in float32):
the largest |difference| must stay within a share of the largest |logit| that depends on the
weight type, and the greedy token must agree at nearly every position (`generation.logit_check`, the
check the fast engine runs on a derived model before it answers). The directory
holds `model.gguf`, the check, a provenance record and a card, sealed with `checksums.json` and
written atomically: a failed check leaves nothing behind.

A GGUF holds weights and a tokenizer, not the answerability gate: llama.cpp and Ollama generate
without it. The card says so and records the adapter's rates without its gate.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kwanzaa_adapter.backend.export import (
    load_as_trained,
    logits,
    sample_prompt_ids,
    verified_with_config,
    write_json,
)
from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.generation.gate import GATE_FILE
from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine
from kwanzaa_adapter.generation.logit_check import GGUF_TOLERANCE, GgufCheck, compare_gguf_logits
from kwanzaa_adapter.modeling.derived import (
    GGUF_FILE,
    convert_to_gguf,
    converter_version,
    write_merged,
)
from kwanzaa_adapter.modeling.loading import resolve_device
from kwanzaa_adapter.safety.artifacts import (
    atomic_directory,
    seal_artifact,
    verify_artifact,
)

GGUF_CHECK_FILE = "gguf_logit_check.json"
GGUF_RECORD = "kwanzaa_gguf_export.json"
GGUF_CARD = "README.md"
GGUF_REQUIRED = (GGUF_FILE, "checksums.json", GGUF_CHECK_FILE, GGUF_RECORD, GGUF_CARD)


class GgufCheckError(Exception):
    """llama.cpp's logits on the exported GGUF differ from the model as trained beyond tolerance (exit 1)."""


def export_gguf(adapter: str | Path, out: str | Path, config: KwanzaaConfig | None = None, *, quant: str = "q8_0",
                allow_base_mismatch: bool = False, trusted_keys: tuple = ()) -> tuple[Path, GgufCheck]:
    """Write the verified adapter, merged into its de-quantized base, as `out`/model.gguf (see module doc)."""
    if quant not in GGUF_TOLERANCE:
        raise ValueError(f"--quant must be one of {sorted(GGUF_TOLERANCE)}, got {quant!r}")
    adapter, out = Path(adapter), Path(out)
    verified, config = verified_with_config(adapter, config, trusted_keys)
    with atomic_directory(out) as staging:
        device = resolve_device(config.training.device)
        model, trained = load_as_trained(config, verified, device, allow_base_mismatch)
        prompts = sample_prompt_ids(trained.tokenizer, config, device)
        reference = [logits(model, ids) for ids in prompts]
        with tempfile.TemporaryDirectory(dir=staging.parent, prefix=".merged-") as merged:
            write_merged(model, trained.tokenizer, Path(merged))
            del model
            convert_to_gguf(Path(merged), staging / GGUF_FILE, quant)
        engine = LlamaCppEngine(staging / GGUF_FILE)
        try:
            fast = [engine.prompt_logits(ids[0].tolist()) for ids in prompts]
        finally:
            engine.close()
        check = compare_gguf_logits(fast, reference, quant)
        if not check.passed:
            raise GgufCheckError(f"{check.summary()}\nnothing was written to {out}")
        write_json(staging / GGUF_CHECK_FILE, check.as_json())
        record = {**trained.provenance, "format": "kwanzaa-adapter.gguf.v1", "dtype": quant,
                  "converter": f"convert_hf_to_gguf.py of {converter_version()}",
                  "answerability_gate": "not carried" if (adapter / GATE_FILE).is_file() else "none"}
        write_json(staging / GGUF_RECORD, record)
        (staging / GGUF_CARD).write_text(card(verified.metadata, check, (adapter / GATE_FILE).is_file()),
                                         encoding="utf-8")
        seal_artifact(staging)
    report = verify_artifact(out, required_files=GGUF_REQUIRED)
    if not report.ok:
        raise GgufCheckError(f"the exported GGUF failed verification:\n{report.format()}")
    return out / GGUF_FILE, check


def card(metadata: dict, check: GgufCheck, has_gate: bool) -> str:
    """The GGUF's card: what it is, how it was checked, the adapter's ungated rates, and the gate's absence."""
    behavioral = (metadata.get("final_metrics") or {}).get("behavioral") or {}
    rates = behavioral.get("adapter") or {}
    lines = [f"# {metadata.get('run_name', 'adapter')} v{metadata.get('artifact_version', '?')} as GGUF ({check.quant})",
             "",
             "The adapter merged into its de-quantized 4-bit base, converted by llama.cpp's convert_hf_to_gguf.py.",
             f"Checked: {check.summary()}.",
             "",
             "## Answer-or-refuse",
             ""]
    if has_gate:
        lines += ["The adapter's answerability gate is NOT in this file: a GGUF cannot carry it, so llama.cpp and "
                  "Ollama leave the answer-or-refuse decision to the generation. Serve the artifact with "
                  "`kwanzaa-adapter serve` to keep the gate.", ""]
    else:
        lines += ["The artifact has no answerability gate; the generation decides answer or refuse.", ""]
    if rates:
        lines += ["Rates of the adapter without its gate on the eval split (measured at training time):", "",
                  "| metric | adapter, ungated |", "| --- | --- |"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rates.items() if isinstance(value, (int, float))]
        lines.append("")
    return "\n".join(lines) + "\n"
