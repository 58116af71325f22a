"""Is a GGUF the model it derives from? llama.cpp's logits against the model's own, within a weight type's tolerance.

`export --format gguf` runs it on the sample prompts before it writes anything; the fast engine runs it on
two short probe prompts (`PROBE_MESSAGES`) before a derived model answers for the first time in a process,
on the very engine that will answer: llama.cpp holds its weights in private memory, not in a mapping of
the cached file, so the bytes checked are the bytes that answer (`generation.llamacpp`).

The largest |difference| must stay within a share of the largest |logit| that depends on the weight type
(`GGUF_TOLERANCE`), and the greedy token must agree at nearly every position (`GGUF_MIN_AGREEMENT`).
Measured on the demo adapter (SmolLM2-135M, 519 positions of the export's sample prompts,
bench/inference.py, bf16-class CPU): f16 1.4% and 0.992, bf16 2.1% and 0.992, Q8_0 6.3% and 0.936 (f16 and
bf16 round each weight once; Q8_0 stores blocks of 32 weights as 8-bit integers with one scale; llama.cpp
keeps its KV cache in f16). The limits leave room above those and still fail a wrong merge: one q_proj's
LoRA B zeroed (of 70) moved the logits by 12% of the largest, the adapter left out by 76%. A reference that
computes in bf16 rounds too: its share is added to the weight type's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

GGUF_TOLERANCE = {"f16": 0.03, "bf16": 0.04, "q8_0": 0.10}
GGUF_MIN_AGREEMENT = {"f16": 0.98, "bf16": 0.98, "q8_0": 0.90}

# Over the probes' few dozen positions one near-tie that flips is 1-3% of the greedy tokens (a tiny model's
# logits lie within 0.9 of each other); the logit difference is the test there, as Q8_0's agreement allows.
PROBE_MIN_AGREEMENT = GGUF_MIN_AGREEMENT["q8_0"]
# Short on purpose: the check runs at every first use, and the weights show on any text (the contract's long
# system prompt made it 230 positions and 2.5 s on the demo model, AVX2 class).
PROBE_MESSAGES = (
    "Kwanzaa is held from December 26 to January 1. When does Kwanzaa begin?",
    "Umoja, unity, is the first of the seven principles. Who designed the first kinara?",
)


@dataclass(frozen=True)
class GgufCheck:
    quant: str
    positions: int
    max_abs_logit: float
    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    share: float  # the tolerance as a share of the largest |logit|
    min_agreement: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agreement >= self.min_agreement

    def as_json(self) -> dict:
        return {"quant": self.quant, "positions": self.positions, "max_abs_logit": self.max_abs_logit,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "tolerance_rule": f"{self.share:g} x the largest |logit| (model as trained)",
                "top1_agreement": self.top1_agreement, "min_top1_agreement": self.min_agreement,
                "passed": self.passed}

    def summary(self) -> str:
        return (f"llama.cpp ({self.quant}) vs the model as trained over {self.positions} positions: max |diff| "
                f"{self.max_abs_diff:.3e}, tolerance {self.tolerance:.3e} ({self.share:g} x the largest "
                f"|logit| {self.max_abs_logit:.2f}); greedy token agreement {self.top1_agreement:.3f} (at least "
                f"{self.min_agreement:g}): {'passed' if self.passed else 'FAILED'}")


def compare_gguf_logits(fast: list[torch.Tensor], reference: list[torch.Tensor], quant: str,
                        reference_dtype: torch.dtype = torch.float32, min_agreement: float | None = None) -> GgufCheck:
    """llama.cpp's logits (positions x vocab, per prompt) against the reference's (1 x positions x vocab)."""
    largest = max(float(r.abs().max()) for r in reference)
    diff, agree, positions = 0.0, 0, 0
    for f, r in zip(fast, reference):
        r = r[0]
        f = f[:, : r.shape[-1]]
        diff = max(diff, float((f - r).abs().max()))
        agree += int((f.argmax(-1) == r.argmax(-1)).sum())
        positions += r.shape[0]
    rounding = reference_dtype in (torch.bfloat16, torch.float16)
    share = GGUF_TOLERANCE[quant] + (GGUF_TOLERANCE["bf16"] if rounding else 0.0)
    least = min_agreement or (GGUF_MIN_AGREEMENT["q8_0"] if rounding else GGUF_MIN_AGREEMENT[quant])
    return GgufCheck(quant, positions, largest, diff, share * largest, agree / positions, share, least)


def probe_ids(tokenizer) -> list[list[int]]:
    """The probe messages as user turns, with the answer prompt appended."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                               tokenize=True)["input_ids"]) for message in PROBE_MESSAGES]


@torch.inference_mode()
def reference_logits(model, prompts: list[list[int]], with_adapter: bool = True
                     ) -> tuple[list[torch.Tensor], torch.dtype]:
    """The model's own logits on each prompt (1 x positions x vocab, float32), without its adapter where asked,
    and the dtype it computed them in."""
    device = next(model.parameters()).device
    plain = contextlib.nullcontext() if with_adapter or not hasattr(model, "disable_adapter") \
        else model.disable_adapter()
    with plain:
        logits = [model(input_ids=torch.tensor([ids], device=device)).logits for ids in prompts]
    return [each.float().cpu() for each in logits], logits[0].dtype


def check_engine(engine, model, tokenizer, *, with_adapter: bool, quant: str) -> GgufCheck:
    """The loaded engine's logits on the probe prompts against the model it derives from (see module doc)."""
    prompts = probe_ids(tokenizer)
    reference, dtype = reference_logits(model, prompts, with_adapter)
    return compare_gguf_logits([engine.prompt_logits(ids) for ids in prompts], reference, quant, dtype,
                               min_agreement=PROBE_MIN_AGREEMENT)
