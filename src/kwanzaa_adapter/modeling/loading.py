"""Base-model loading (4-bit where configured), precision, LoRA, and the verified adapter.

Where a model comes from (hub id, directory, GGUF, packaged default) is `sources`.

QLoRA is a field, not a second code path: `quantization.load_in_4bit` only changes how the base
weights are loaded; LoRA and QLoRA share every other line.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from kwanzaa_adapter.config import ArchitectureConfig, KwanzaaConfig
from kwanzaa_adapter.modeling.planning import architecture_from_hf_config, gradient_checkpointing_on
from kwanzaa_adapter.modeling.precision import PrecisionDecision, probe_shape, resolve_precision
from kwanzaa_adapter.modeling.sources import (
    ModelReferenceError,
    ModelSource,
    cache_root,
    materialize,
    resolve_model_reference,
)

log = logging.getLogger(__name__)


def resolve_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelReferenceError("training.device: cuda requested but no CUDA device is available")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_architecture(config: KwanzaaConfig, source: ModelSource) -> tuple[ArchitectureConfig, str]:
    """The declared shape when the profile has one, else the model's own config (never its weights)."""
    if config.model.architecture is not None:
        return config.model.architecture, "declared in the model profile"
    from transformers import AutoConfig

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


def run_precision(config: KwanzaaConfig, device: str, arch: ArchitectureConfig | None = None) -> PrecisionDecision:
    """`model.precision` resolved on `device` for this model's shapes (the CPU probe cached per machine)."""
    if arch is None:
        arch, _ = resolve_architecture(config, resolve_model_reference(config.model.name_or_path,
                                                                       config.model.revision))
    decision = resolve_precision(config.model.precision, device, probe_shape(arch.hidden_size, arch.intermediate_size),
                                 cache_dir=cache_root() / "precision")
    log.info(decision.describe())
    return decision


def quantization_config(config: KwanzaaConfig, precision: str):
    """bitsandbytes' 4-bit settings, computing in `precision` (the resolved model.precision)."""
    from transformers import BitsAndBytesConfig

    q = config.quantization
    if not q.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, precision),
        bnb_4bit_quant_storage=getattr(torch, q.quant_storage),
    )


def load_tokenizer(location: str, config: KwanzaaConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        location, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
    )
    if tokenizer.chat_template is None:
        raise ModelReferenceError(f"{config.model.name_or_path}: the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(config: KwanzaaConfig, device: str, precision: str):
    """The base model and its tokenizer, 4-bit where the config says so; frozen, on `device`.

    `precision` is the resolved model.precision (`run_precision`): the dtype of the unquantized
    weights and of the 4-bit compute.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_reference(config.model.name_or_path, config.model.revision)
    location = materialize(source)
    try:
        tokenizer = load_tokenizer(location, config)
        model = AutoModelForCausalLM.from_pretrained(
            location,
            revision=config.model.revision,
            trust_remote_code=config.model.trust_remote_code,
            dtype=getattr(torch, precision),
            attn_implementation=config.model.attn_implementation,
            quantization_config=quantization_config(config, precision),
            device_map={"": device},
        )
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            " Without network access, download the model where there is one and set "
            "model.name_or_path to its local directory."
            if source.kind == "hub" else ""
        )
        raise ModelReferenceError(f"cannot load base model '{config.model.name_or_path}': {first}.{hint}") from None
    model.config.use_cache = False
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    keep_4bit_layout_fixed(model)
    return model, tokenizer, source


def set_compute_precision(model, dtype: torch.dtype) -> int:
    """Compute in `dtype` from now on: the 4-bit layers' compute dtype and every unquantized floating
    parameter (embeddings, norms; LoRA weights keep theirs). The packed 4-bit data and its
    quantization state are untouched. Returns the number of parameters cast.

    The backend verifies a base model in the precision its adapter was trained in (the digest
    covers the unquantized weights in that dtype), then computes in the precision this machine
    runs fast: bf16 -> fp32 is exact, so nothing of the verified model is lost that way.
    """
    cast = 0
    for name, module in model.named_modules():
        if hasattr(module, "compute_dtype") and hasattr(module, "weight") and \
                type(module.weight).__name__ == "Params4bit":
            module.compute_dtype = dtype
        for parameter_name, parameter in module.named_parameters(recurse=False):
            if type(parameter).__name__ == "Params4bit" or "lora_" in name or not parameter.is_floating_point():
                continue
            if parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)
                cast += 1
    return cast


def keep_4bit_layout_fixed(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode rewrites the weight into another
    layout and rounds its quantization constants to bf16: a lossy, in-place change of the base
    weights, which the baseline checksums rightly report. Training must leave the base untouched,
    so that path is switched off per module.
    """
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def lora_config(config: KwanzaaConfig, num_layers: int | None = None):
    """PEFT's LoraConfig; `num_layers` (the model's block count) is needed when `adapter.top_layers` is set."""
    from peft import LoraConfig

    a = config.adapter
    layers = None
    if a.top_layers is not None:
        if num_layers is None or a.top_layers > num_layers:
            raise ModelReferenceError(f"adapter.top_layers: {a.top_layers} is more than the {num_layers} decoder "
                                      f"blocks of {config.model.name_or_path}")
        layers = list(range(num_layers - a.top_layers, num_layers))
    return LoraConfig(
        r=a.r,
        lora_alpha=a.alpha,
        lora_dropout=a.dropout,
        target_modules=list(a.target_modules),
        bias=a.bias,
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


def decoder_block_count(model) -> int:
    config = model.config
    return getattr(config, "get_text_config", lambda: config)().num_hidden_layers


def prepare_quantized_base(model, config: KwanzaaConfig, gradient_checkpointing: bool):
    """k-bit preparation of a 4-bit base, the same for training and for loading an adapter to serve.

    PEFT's `prepare_model_for_kbit_training` casts the unquantized fp16/bf16 weights to fp32, which
    fp16 training needs for stability. With `quantization.upcast_unquantized: false` they keep
    `model.dtype`: with bf16 the hidden states stay bf16 and the activations kept for the backward
    pass shrink by about a third (bench/NOTES.md); the base weights are only frozen.
    """
    if config.quantization.upcast_unquantized:
        from peft import prepare_model_for_kbit_training

        with warnings.catch_warnings():  # a transformers deprecation inside peft, nothing to act on
            warnings.simplefilter("ignore", FutureWarning)
            return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def gradient_checkpointing_for(model, config: KwanzaaConfig) -> bool:
    """`training.gradient_checkpointing` resolved for this model on its device (auto: by free memory)."""
    precision = str(model.dtype).removeprefix("torch.")
    return gradient_checkpointing_on(config, architecture_from_hf_config(model.config), model.device.type, precision)


def add_adapter(model, config: KwanzaaConfig, gradient_checkpointing: bool | None = None):
    """k-bit preparation (4-bit only) and LoRA; returns the PEFT model.

    `gradient_checkpointing`: whether the Trainer will recompute activations (default: the config's, resolved).
    """
    from peft import get_peft_model

    if gradient_checkpointing is None:
        gradient_checkpointing = gradient_checkpointing_for(model, config)
    if config.quantization.load_in_4bit:
        model = prepare_quantized_base(model, config, gradient_checkpointing)
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    missing = [t for t in config.adapter.target_modules if not any(n.split(".")[-1] == t for n, _ in model.named_modules())]
    if missing:
        raise ModelReferenceError(
            f"adapter.target_modules: {missing} not found in {config.model.name_or_path}; "
            f"its linear layers are {sorted(linear_module_names(model))}"
        )
    return get_peft_model(model, lora_config(config, decoder_block_count(model)))


def linear_module_names(model) -> set[str]:
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__.startswith("Linear"):
            names.add(name.split(".")[-1])
    return names


class AdapterVerificationError(Exception):
    """An adapter artifact failed verification and was not loaded (exit 1)."""


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_verified_adapter(model, artifact_dir: str | Path, trusted_keys: Sequence[str | Path] = ()):
    """Wrap `model` with the adapter of `artifact_dir`, only after the artifact passes `verify` (and,
    with trusted keys, after one of them is found to have signed it): checked again at the last moment."""
    from peft import PeftModel

    from kwanzaa_adapter.safety.artifacts import sealed_copy, verify_artifact
    from kwanzaa_adapter.safety.signing import require_trusted_signature

    require_trusted_signature(artifact_dir, trusted_keys)
    report = verify_artifact(Path(artifact_dir))
    if not report.ok:
        raise AdapterVerificationError(f"refusing to load the adapter in {artifact_dir}:\n{report.format()}")
    # PEFT reads a private copy of the bytes just verified, not the artifact's files again.
    with sealed_copy(artifact_dir, ADAPTER_FILES, report.digests) as verified:
        return PeftModel.from_pretrained(model, str(verified), is_trainable=False)
