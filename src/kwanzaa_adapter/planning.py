"""`train --dry-run`: the plan of a run and an estimate of its accelerator memory, without loading weights.

The estimate follows the seed's memory layout (base weights at 4 bits, adapter, gradients,
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


def adapter_parameter_count(arch: ArchitectureConfig, r: int, targets: list[str]) -> tuple[int, list[str]]:
    shapes = linear_shapes(arch)
    unknown = [t for t in targets if t not in shapes]
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)
    return per_layer * arch.num_hidden_layers, unknown


def estimate_memory(config: KwanzaaConfig, arch: ArchitectureConfig, device: str,
                    checkpointing: bool | None = None) -> MemoryEstimate:
    """Bytes by component; `checkpointing` (default: the config's, auto resolved here) sets the activations."""
    if checkpointing is None:
        checkpointing = gradient_checkpointing_on(config, arch, device)
    est = MemoryEstimate(device=device)
    shapes = linear_shapes(arch)
    block_linear = arch.num_hidden_layers * sum(i * o for i, o in shapes.values())
    embeddings = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    other = max(arch.num_parameters - block_linear - embeddings, 0)  # norms and the like
    weight_bytes = DTYPE_BYTES[config.model.dtype]
    if config.quantization.load_in_4bit:
        per_param = 0.5 + QUANT_CONSTANT_BYTES[config.quantization.double_quant]
        est.components["base weights (4-bit linear layers)"] = block_linear * per_param
        est.components["base weights (embeddings, norms)"] = (embeddings + other) * weight_bytes
    else:
        est.components["base weights"] = arch.num_parameters * weight_bytes

    lora, unknown = adapter_parameter_count(arch, config.adapter.r, list(config.adapter.target_modules))
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
    act_bytes = 2 if config.quantization.compute_dtype != "float32" else 4
    per_layer_full = 17 * act_bytes * tokens * arch.hidden_size  # 34·s·b·h bytes at 16 bits
    if checkpointing:
        stored = arch.num_hidden_layers * tokens * arch.hidden_size * act_bytes
        est.components["activations (checkpointed inputs + one block)"] = stored + per_layer_full
    else:
        est.components["activations (all blocks)"] = arch.num_hidden_layers * per_layer_full
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
                              free_bytes: int | None = None) -> bool:
    """`training.gradient_checkpointing` for this run: true/false as set; auto recomputes activations only
    when the estimate without recomputation exceeds AUTO_CHECKPOINTING_SHARE of the free memory.

    Recomputation costs a third more compute per token (bench/NOTES.md); it pays only when memory is short.
    """
    setting = config.training.gradient_checkpointing
    if setting != "auto":
        return setting
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    return estimate_memory(config, arch, device, checkpointing=False).total > AUTO_CHECKPOINTING_SHARE * free


def steps_per_epoch(rows: int, config: KwanzaaConfig, world_size: int = 1) -> int:
    per_step = config.training.per_device_batch_size * config.training.gradient_accumulation_steps * world_size
    return max(math.ceil(rows / per_step), 1)


def format_plan(config: KwanzaaConfig, source, arch: ArchitectureConfig, arch_origin: str,
                train_rows: int, eval_rows: int, device: str) -> str:
    t, a, q = config.training, config.adapter, config.quantization
    lora, _ = adapter_parameter_count(arch, a.r, list(a.target_modules))
    per_epoch = steps_per_epoch(train_rows, config)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_epochs)
    checkpointing = gradient_checkpointing_on(config, arch, device)
    est = estimate_memory(config, arch, device, checkpointing)
    quant = (f"4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {q.compute_dtype}"
             if q.load_in_4bit else f"none ({config.model.dtype} weights)")
    lines = [
        f"Plan for run '{config.run.name}' v{config.run.version} (config digest {config.digest()[:12]})",
        f"  base model      {config.model.name_or_path} [{source.kind}]"
        + (f" -> {source.path}" if source.path else "") + f"  (family {config.model.family})",
        f"  shape           {arch.num_parameters / 1e9:.3f}B params, {arch.num_hidden_layers} layers, "
        f"width {arch.hidden_size}, vocab {arch.vocab_size}  ({arch_origin})",
        f"  quantization    {quant}",
        f"  adapter         LoRA r={a.r} alpha={a.alpha} dropout={a.dropout} on {', '.join(a.target_modules)}"
        f"  = {lora / 1e6:.2f}M trainable params ({100 * lora / arch.num_parameters:.2f}%)",
        f"  data            {train_rows} train rows, {eval_rows} eval rows, max {config.data.max_seq_length} "
        f"tokens, {config.data.batching}",
        f"  batch           {t.per_device_batch_size} per device x {t.gradient_accumulation_steps} accumulation "
        f"= effective {t.per_device_batch_size * t.gradient_accumulation_steps}",
        f"  schedule        {per_epoch} steps/epoch x {t.num_epochs} epochs = {total_steps} steps, lr {t.learning_rate} "
        f"{t.lr_scheduler}, warmup {t.warmup_ratio}",
        f"  optimizer       {t.optimizer}, clip {t.max_grad_norm}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}{' (auto)' if t.gradient_checkpointing == 'auto' else ''}, "
        f"device {device}",
        f"  output          {config.run_dir}",
        f"Estimated {device} memory (batch of {t.per_device_batch_size} x {config.data.max_seq_length} tokens):",
    ]
    for name, size in est.components.items():
        lines.append(f"  {name:<46} {size / GIB:8.2f} GiB")
    lines.append(f"  {'total':<46} {est.total / GIB:8.2f} GiB")
    if device == "cuda":
        verdict = "within" if est.total / GIB <= SEED_GPU_BUDGET_GIB else "OVER"
        lines.append(f"  {verdict} the seed's {SEED_GPU_BUDGET_GIB:.0f} GiB GPU budget")
        if verdict == "OVER":
            lines.append("  to fit: enable gradient checkpointing, shorten data.max_seq_length, "
                         "or lower training.per_device_batch_size")
    lines += [f"  note: {n}" for n in est.notes]
    return "\n".join(lines)


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


def resolve_architecture(config: KwanzaaConfig, source) -> tuple[ArchitectureConfig, str]:
    """The declared shape when the profile has one, else the model's own config (never its weights)."""
    if config.model.architecture is not None:
        return config.model.architecture, "declared in the model profile"
    from transformers import AutoConfig

    from kwanzaa_adapter.modeling import ModelReferenceError

    kwargs = {"revision": config.model.revision, "trust_remote_code": config.model.trust_remote_code}
    if source.kind in ("packaged", "gguf"):
        location, kwargs["gguf_file"] = source.path.parent, source.path.name
    else:
        location = source.path or source.reference
    try:
        return architecture_from_hf_config(AutoConfig.from_pretrained(location, **kwargs)), "read from its config"
    except OSError as exc:
        raise ModelReferenceError(
            f"cannot read the config of '{config.model.name_or_path}' ({str(exc).splitlines()[0]}); "
            "declare model.architecture in the model profile to plan without it"
        ) from None


def plan_run(config_path, overrides: tuple[str, ...] = (), output_dir: str | None = None) -> str:
    """`train --dry-run`: step 1 of the workflow, then the plan; loads no weights, writes nothing."""
    from kwanzaa_adapter.data.validation import load_examples
    from kwanzaa_adapter.modeling import resolve_device, resolve_model_reference
    from kwanzaa_adapter.train_adapter import load_configuration

    config = load_configuration(config_path, overrides, output_dir)
    source = resolve_model_reference(config.model.name_or_path, config.model.revision)
    arch, origin = resolve_architecture(config, source)
    requested = config.training.device
    device = requested if requested != "auto" else resolve_device("auto")
    train_rows = len(load_examples(config.data.train_file, config.data.system_prompt))
    eval_rows = len(load_examples(config.data.eval_file, config.data.system_prompt))
    return format_plan(config, source, arch, origin, train_rows, eval_rows, device)
