"""Estimates of a run from its config and the model's shape, without loading weights: memory and wall time.

`train --dry-run` (cli/dryrun.py) prints them; `gradient_checkpointing: auto` decides by the memory
estimate. The memory estimate follows the seed's memory layout (base weights at 4 bits, adapter, gradients,
optimizer state, activations, runtime overhead). Activation sizes use the per-layer estimate of
Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models":
about 34·s·b·h bytes per layer in 16-bit with a fused attention kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kwanzaa_adapter.config import ArchitectureConfig, KwanzaaConfig

GIB = 1024**3
SEED_GPU_BUDGET_GIB = 12.0
# `gradient_checkpointing: auto` turns recomputation on above this share of the free memory: the
# estimate leaves out allocator fragmentation and the evaluation passes.
AUTO_CHECKPOINTING_SHARE = 0.5
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_BYTES_PER_PARAM = {"paged_adamw_8bit": 2, "adamw_8bit": 2, "paged_adamw_32bit": 8, "adamw_torch": 8}
# NF4 with block size 64: an fp32 absmax per block, or with double quantization an 8-bit absmax
# per block plus an fp32 constant per 256 blocks.
QUANT_CONSTANT_BYTES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}


@dataclass
class MemoryEstimate:
    device: str
    components: dict[str, float] = field(default_factory=dict)  # name -> bytes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.components.values())


def linear_shapes(arch: ArchitectureConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of each projection in one decoder block (Llama/OLMo naming)."""
    h, inter = arch.hidden_size, arch.intermediate_size
    kv = h * arch.num_key_value_heads // arch.num_attention_heads
    return {
        "q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
        "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
    }


def adapted_layers(config: KwanzaaConfig, arch: ArchitectureConfig) -> int:
    """Decoder blocks that carry LoRA (`adapter.top_layers`, else all of them)."""
    top = config.adapter.top_layers
    return arch.num_hidden_layers if top is None else min(top, arch.num_hidden_layers)


def adapter_parameter_count(arch: ArchitectureConfig, r: int, targets: list[str],
                            layers: int | None = None) -> tuple[int, list[str]]:
    """LoRA parameters over `layers` blocks (default all), and the targets of unknown shape."""
    shapes = linear_shapes(arch)
    unknown = [t for t in targets if t not in shapes]
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return per_layer * (arch.num_hidden_layers if layers is None else layers), unknown


def block_linear_parameters(arch: ArchitectureConfig) -> int:
    return arch.num_hidden_layers * sum(i * o for i, o in linear_shapes(arch).values())


def estimate_memory(config: KwanzaaConfig, arch: ArchitectureConfig, device: str,
                    checkpointing: bool | None = None, precision: str = "bfloat16") -> MemoryEstimate:
    """Bytes by component; `checkpointing` (default: the config's, auto resolved here) sets the activations.

    `precision` is the resolved model.precision: the dtype of unquantized weights and activations.
    """
    if checkpointing is None:
        checkpointing = gradient_checkpointing_on(config, arch, device, precision)
    est = MemoryEstimate(device=device)
    block_linear = block_linear_parameters(arch)
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    other = max(arch.num_parameters - block_linear - embeddings, 0)  # norms and the like
    weight_bytes = DTYPE_BYTES[precision]
    if config.quantization.load_in_4bit:
        per_param = 0.5 + QUANT_CONSTANT_BYTES[config.quantization.double_quant]
        est.components["base weights (4-bit linear layers)"] = block_linear * per_param
        est.components["base weights (embeddings, norms)"] = (embeddings + other) * weight_bytes
    else:
        est.components["base weights"] = arch.num_parameters * weight_bytes

    lora, unknown = adapter_parameter_count(arch, config.adapter.r, list(config.adapter.target_modules),
                                            adapted_layers(config, arch))
    if unknown:
        est.notes.append(f"adapter size excludes target modules of unknown shape: {unknown}")
    optimizer = config.training.optimizer
    if device != "cuda" and optimizer != "adamw_torch":
        est.notes.append(f"{optimizer} needs CUDA; on {device} the run falls back to adamw_torch")
        optimizer = "adamw_torch"
    est.components["LoRA adapter (fp32)"] = lora * 4
    est.components["gradients (adapter only)"] = lora * 4
    est.components[f"optimizer state ({optimizer})"] = lora * OPTIMIZER_BYTES_PER_PARAM[optimizer]

    tokens = config.training.per_device_batch_size * config.data.max_seq_length
    act_bytes = DTYPE_BYTES[precision]
    per_layer_full = 17 * act_bytes * tokens * arch.hidden_size  # 34·s·b·h bytes at 16 bits
    # Autograd keeps activations only from the lowest adapted block up.
    kept_layers = adapted_layers(config, arch)
    if checkpointing:
        stored = kept_layers * tokens * arch.hidden_size * act_bytes
        est.components["activations (checkpointed inputs + one block)"] = stored + per_layer_full
    else:
        est.components[f"activations ({kept_layers} adapted blocks)"] = kept_layers * per_layer_full
    # Logits in compute dtype, their fp32 up-cast for the loss, and its gradient.
    est.components["logits and loss"] = tokens * arch.vocab_size * (act_bytes + 4 + 4)
    if device == "cuda":
        est.components["CUDA context and allocator slack"] = 1.0 * GIB
    else:
        est.notes.append(f"on {device}, attention may use the quadratic math kernel: "
                         f"{arch.num_attention_heads}·s² scores per block are not counted above")
    return est


def free_memory_bytes(device: str) -> int:
    """Memory a run could still take on `device`: free CUDA memory, else available RAM."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def gradient_checkpointing_on(config: KwanzaaConfig, arch: ArchitectureConfig, device: str,
                              precision: str = "bfloat16", free_bytes: int | None = None) -> bool:
    """`training.gradient_checkpointing` for this run: true/false as set; auto recomputes activations only
    when the estimate without recomputation exceeds AUTO_CHECKPOINTING_SHARE of the free memory.

    Recomputation costs a third more compute per token (bench/NOTES.md); it pays only when memory is short.
    """
    setting = config.training.gradient_checkpointing
    if setting != "auto":
        return setting
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    needed = estimate_memory(config, arch, device, checkpointing=False, precision=precision).total
    return needed > AUTO_CHECKPOINTING_SHARE * free


def steps_per_epoch(rows: int, config: KwanzaaConfig, world_size: int = 1) -> int:
    per_step = config.training.per_device_batch_size * config.training.gradient_accumulation_steps * world_size
    return max(math.ceil(rows / per_step), 1)


def architecture_from_hf_config(hf) -> ArchitectureConfig:
    """Shape of a transformers config, with the parameter count derived from it."""
    text = getattr(hf, "get_text_config", lambda: hf)()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    shape = dict(
        hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
        num_key_value_heads=kv_heads, vocab_size=text.vocab_size,
        tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False)),
    )
    provisional = ArchitectureConfig(num_parameters=1, **shape)
    blocks = provisional.num_hidden_layers * (sum(i * o for i, o in linear_shapes(provisional).values())
                                              + 2 * provisional.hidden_size)
    embeddings = provisional.vocab_size * provisional.hidden_size * (1 if provisional.tie_word_embeddings else 2)
    return provisional.model_copy(update={"num_parameters": blocks + embeddings + provisional.hidden_size})


# --------------------------------------------------------------------------- wall time

# Model FLOP/s each kind of work reaches, as a multiple of the probe's measured product rate
# (`precision`: 64 tokens through the model's MLP up-projection, in the resolved dtype), measured
# on the demo on both CPU classes (bench/NOTES.md, "Wall-time estimate"). fp32 training reaches
# about the probe's rate and batched prefill more (its products are larger than the probe's); bf16
# training a third of it: its products are 3x faster than fp32's, the work around them (attention's
# backward kernel, element-wise ops, de-quantizing the 4-bit weights) is not. Decoding multiplies
# one token per prompt per step. The bf16 multiples sit between two demo runs whose probes read
# 457 and 678 GFLOP/s while training ran at 365 and 320 tokens/s: the probe's all-thread bf16 rate
# moves more than training does on a shared host, and the estimate is meant to miss either run by
# the same factor (about 1.35), not to fit one of them exactly.
UTILISATION = {
    "bfloat16": {"train": 0.27, "forward": 0.35, "prefill": 0.45, "decode": 0.07},
    "float32": {"train": 0.83, "forward": 0.83, "prefill": 1.1, "decode": 0.30},
}
UTILISATION["float16"] = UTILISATION["bfloat16"]
# The behavioral evaluation on the fast engine (llama.cpp on a derived GGUF), against the same peak:
# one pre-fill per prompt and model (the adapter with and without its gate share theirs, and their
# decoding until they part), so two pre-fill passes and about one decoding pass; plus deriving the
# two GGUFs. Calibrated on the demo (bf16 class, bf16 GGUF, 52 s measured: 2 x 24.7k prompt tokens
# at ~1,450 tokens/s, 9k new tokens at ~650 tokens/s in batches of 48 sequences, 5 s of derivation).
FAST_ENGINE_UTILISATION = {"prefill": 0.54, "decode": 0.38}
DERIVE_SECONDS, DERIVE_SECONDS_PER_PARAMETER = 1.5, 2.5e-8
# Loading, quantizing, checksumming and publishing: a fixed cost plus a cost per base parameter.
# Two make demo runs on the bf16 class measured 3-4 s here (wall time less the other phases) against
# 16 s estimated by the earlier 8 s + 6e-8 per parameter; the short run of test_planning then came out
# at 0.53 of its estimate once the behavioral evaluation ran on llama.cpp (bench/NOTES.md).
SETUP_SECONDS, SETUP_SECONDS_PER_PARAMETER = 4.0, 2e-8


@dataclass(frozen=True)
class SplitCounts:
    """Token counts of a tokenized split: (tokens, supervised tokens) per row."""

    rows: tuple[tuple[int, int], ...]
    copied: int = 0  # prompt tokens the fast engine copies from a beginning shared with another prompt

    @property
    def tokens(self) -> int:
        return sum(t for t, _ in self.rows)

    @property
    def supervised(self) -> int:
        return sum(s for _, s in self.rows)


@dataclass
class TimeEstimate:
    """Seconds by phase, with the FLOPs and rates they come from (`format` prints it)."""

    peak_flops: float
    precision: str
    phases: dict[str, float] = field(default_factory=dict)  # name -> seconds
    details: dict[str, str] = field(default_factory=dict)  # name -> what was counted

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def format(self) -> str:
        lines = [f"Estimated wall time on this machine ({self.precision} products measured at "
                 f"{self.peak_flops / 1e9:.0f} GFLOP/s; reached, as a multiple of that: "
                 + ", ".join(f"{k} {v:.2f}x" for k, v in UTILISATION[self.precision].items()) + "):"]
        for name, seconds in self.phases.items():
            lines.append(f"  {name:<30} {_minutes(seconds):>9}   {self.details.get(name, '')}")
        lines.append(f"  {'total':<30} {_minutes(self.total):>9}")
        return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def training_flops(config: KwanzaaConfig, arch: ArchitectureConfig, rows: tuple[tuple[int, int], ...],
                   checkpointing: bool) -> float:
    """Model FLOPs of one pass of LoRA training over `rows` on a frozen base.

    Every block runs forward (2 per block parameter and token); input gradients (2 more) only
    through the adapted blocks, where autograd stops; recomputation (checkpointing) repeats their
    forward. LoRA: 6 per parameter and token. The vocabulary head only at supervised positions
    (forward and backward). Causal attention: 2 h T^2 per block forward, twice that backward.
    """
    block, layers = block_linear_parameters(arch), arch.num_hidden_layers
    adapted = adapted_layers(config, arch)
    lora, _ = adapter_parameter_count(arch, config.adapter.r, list(config.adapter.target_modules), adapted)
    share = adapted / layers
    per_token = 2 * block * (1 + share * (2 if checkpointing else 1)) + 6 * lora
    head = 4 * arch.vocab_size * arch.hidden_size
    attention = 2 * arch.hidden_size * (layers + 2 * adapted + (adapted if checkpointing else 0))
    return float(sum(per_token * t + head * s + attention * t * t for t, s in rows))


def forward_flops(arch: ArchitectureConfig, tokens: int, logits_at: int) -> float:
    """One forward pass over a sequence of `tokens`, with vocabulary logits at `logits_at` positions."""
    return float(2 * block_linear_parameters(arch) * tokens + 2 * arch.vocab_size * arch.hidden_size * logits_at
                 + 2 * arch.hidden_size * arch.num_hidden_layers * tokens * tokens)


def generation_flops(arch: ArchitectureConfig, rows: tuple[tuple[int, int], ...], batch_size: int,
                     max_new_tokens: int) -> tuple[float, float, int]:
    """(prefill FLOPs, decode FLOPs, new tokens) of batched greedy generation over eval rows.

    A row's prompt is its unsupervised tokens and its answer as long as the reference answer (up
    to max_new_tokens). Prompts are batched longest first, as `evaluation.generate` does; a batch
    decodes as many steps as its longest answer, every sequence of it each step.
    """
    ordered = sorted(((t - s, min(s, max_new_tokens)) for t, s in rows), reverse=True)
    per_token = 2 * block_linear_parameters(arch) + 2 * arch.vocab_size * arch.hidden_size
    prefill = decode = 0.0
    new_tokens = 0
    for first in range(0, len(ordered), batch_size):
        batch = ordered[first:first + batch_size]
        width, steps = max(p for p, _ in batch), max(a for _, a in batch)
        prefill += sum(forward_flops(arch, width, 1) for _ in batch)
        context = width + steps / 2
        decode += steps * len(batch) * (per_token + 4 * arch.hidden_size * arch.num_hidden_layers * context)
        new_tokens += sum(a for _, a in batch)
    return prefill, decode, new_tokens


def estimate_time(config: KwanzaaConfig, arch: ArchitectureConfig, train: SplitCounts, evaluation: SplitCounts,
                  peak_flops: float, precision: str, checkpointing: bool, world_size: int = 1,
                  gate_prompts: tuple[int, ...] = (), gate_depth: int | None = None,
                  fast_engine: bool = False, evidence_depth: int | None = None) -> TimeEstimate:
    """Wall time of `train_adapter` by phase: FLOPs over the measured peak at UTILISATION.

    Training covers the configured epochs (or max_steps); each eval-loss pass covers the eval
    split; the gate's fitting is one forward pass over each decision prompt (`gate_prompts`, their
    token counts) up to its deepest candidate block (`gate_depth`); the behavioral evaluation generates for the eval split twice (base, then adapter),
    three times with a gate (and adapter + gate); on the fast engine (`fast_engine`) see
    FAST_ENGINE_UTILISATION. The base model answers under the contract's grammar: it decodes to the
    token limit (an untrained base seldom closes the object sooner). With an evidence selector that
    blocks 1..`evidence_depth` read, the answered share of the prompts (all but `gate.refusal_prior`)
    is read once more on the reference path.
    """
    t, e = config.training, config.evaluation
    est = TimeEstimate(peak_flops, precision)
    rows_per_step = t.per_device_batch_size * t.gradient_accumulation_steps * world_size
    per_epoch = steps_per_epoch(len(train.rows), config, world_size)
    steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_epochs)
    passes = t.num_epochs if t.max_steps <= 0 else steps * rows_per_step / max(len(train.rows), 1)
    rate, share = peak_flops * world_size, UTILISATION[precision]

    est.phases["load, checksums, artifact"] = SETUP_SECONDS + SETUP_SECONDS_PER_PARAMETER * arch.num_parameters
    flops = training_flops(config, arch, train.rows, checkpointing) * passes
    est.phases["training"] = flops / (rate * share["train"])
    est.details["training"] = f"{steps} steps, {train.tokens * passes:,.0f} tokens, {flops / 1e12:.0f} TFLOP"

    evals = steps // e.eval_steps + (0 if steps % e.eval_steps == 0 else 1)  # plus the final one
    per_eval = sum(forward_flops(arch, tokens, supervised) for tokens, supervised in evaluation.rows)
    est.phases["eval-loss passes"] = evals * per_eval / (rate * share["forward"])
    est.details["eval-loss passes"] = f"{evals} x {evaluation.tokens:,} tokens"

    if gate_prompts:
        # A batched prefill without logits, stopped after the deepest candidate block.
        depth = gate_depth / arch.num_hidden_layers if gate_depth else 1.0
        gate_flops = depth * sum(forward_flops(arch, tokens, 0) for tokens in gate_prompts)
        est.phases["gate fitting"] = gate_flops / (peak_flops * share["prefill"])
        est.details["gate fitting"] = f"{len(gate_prompts)} decision prompts, {sum(gate_prompts):,} tokens"

    if e.behavioral:
        rows = evaluation.rows[: e.max_examples] if e.max_examples else evaluation.rows
        prefill, decode, new_tokens = generation_flops(arch, rows, e.batch_size, e.max_new_tokens)
        _, base_decode, _ = generation_flops(arch, tuple((t - s + e.max_new_tokens, e.max_new_tokens) for t, s in rows),
                                             e.batch_size, e.max_new_tokens)
        passes = 3 if gate_prompts else 2
        if fast_engine:
            fast = FAST_ENGINE_UTILISATION
            computed = 1 - evaluation.copied / max(sum(t - s for t, s in rows), 1)
            est.phases["behavioral evaluation"] = (
                DERIVE_SECONDS + DERIVE_SECONDS_PER_PARAMETER * arch.num_parameters  # the two GGUFs side by side
                + (2 * computed * prefill / fast["prefill"] + (decode + base_decode) / fast["decode"]) / peak_flops)
            est.details["behavioral evaluation"] = (f"llama.cpp: 2 pre-fills x {len(rows)} prompts "
                                                    f"({computed:.0%} of their tokens computed), "
                                                    f"~{new_tokens:,} new tokens and the base's to the limit")
        else:
            est.phases["behavioral evaluation"] = (passes * prefill / share["prefill"]
                                                   + ((passes - 1) * decode + base_decode) / share["decode"]) / peak_flops
            est.details["behavioral evaluation"] = f"{passes} x {len(rows)} prompts, ~{new_tokens:,} new tokens"
        if evidence_depth:
            answered = 1 - config.gate.refusal_prior
            reads = answered * evidence_depth / arch.num_hidden_layers * prefill / share["prefill"] / peak_flops
            est.phases["behavioral evaluation"] += reads
            est.details["behavioral evaluation"] += f"; evidence read on ~{answered:.0%} of them (blocks 1-{evidence_depth})"
    return est
