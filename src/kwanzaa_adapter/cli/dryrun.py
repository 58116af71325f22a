"""`train --dry-run`: the plan of a run, its resolved precision, memory estimate and wall-time estimate.

Step 1 of the workflow runs as in training (config, data files, model reference); then the model's
shape is read from its profile or its config, never its weights, and the data is tokenized (the
tokenization cache is shared with training). Nothing is written to the output directory.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from kwanzaa_adapter.config import ArchitectureConfig, KwanzaaConfig
from kwanzaa_adapter.generation.prefixes import copied_tokens
from kwanzaa_adapter.modeling import loading, sources
from kwanzaa_adapter.modeling.planning import (
    GIB,
    SEED_GPU_BUDGET_GIB,
    SplitCounts,
    TimeEstimate,
    adapted_layers,
    adapter_parameter_count,
    estimate_memory,
    estimate_time,
    gradient_checkpointing_on,
    steps_per_epoch,
)
from kwanzaa_adapter.modeling.precision import PrecisionDecision, measure_products, probe_shape

log = logging.getLogger(__name__)
CHARACTERS_PER_TOKEN = 3.8  # when the tokenizer is out of reach (a hub model not downloaded yet)


@dataclass(frozen=True)
class Plan:
    text: str
    eta: TimeEstimate | None  # None when the run's device is not on this machine
    precision: PrecisionDecision


def plan_run(config_path, overrides: tuple[str, ...] = (), output_dir: str | None = None) -> str:
    """The dry run's text: step 1 of the workflow, then the plan; loads no weights, writes nothing."""
    return make_plan(config_path, overrides, output_dir).text


def make_plan(config_path, overrides: tuple[str, ...] = (), output_dir: str | None = None) -> Plan:
    """Step 1 of the workflow, then the plan, precision, memory and time estimates."""
    from kwanzaa_adapter.training.workflow import load_configuration

    config = load_configuration(config_path, overrides, output_dir)
    source = sources.resolve_model_reference(config.model.name_or_path, config.model.revision)
    arch, origin = loading.resolve_architecture(config, source)
    requested = config.training.device  # a run planned for a GPU is planned here even without one
    device = requested if requested != "auto" else loading.resolve_device("auto")
    precision = loading.run_precision(config, device, arch)
    train, evaluation, counted, tokenizer = split_counts(config, source)
    checkpointing = gradient_checkpointing_on(config, arch, device, precision.resolved)
    lines = [format_plan(config, source, arch, origin, len(train.rows), len(evaluation.rows), device, precision,
                         checkpointing)]
    eta = time_estimate(config, arch, train, evaluation, precision, checkpointing, gate_prompt_lengths(config, tokenizer))
    if eta is None:
        lines.append(f"No wall-time estimate: the run's device ({device}) is not on this machine to measure.")
    else:
        lines.append(eta.format())
        if not counted:
            lines.append(f"  note: token counts estimated from characters ({CHARACTERS_PER_TOKEN} per token): "
                         "the tokenizer is not at hand")
    return Plan("\n".join(lines), eta, precision)


def gate_prompt_lengths(config: KwanzaaConfig, tokenizer) -> tuple[int, ...]:
    """Prompt tokens of every decision example the gate and the evidence selector read (none when neither is fitted)."""
    if not (config.gate.fit or config.evidence.fit):
        return ()
    from kwanzaa_adapter.evaluation.eval_set import load_eval_items

    items = load_eval_items(config.gate.decision_file, config.data.system_prompt)
    if tokenizer is None:
        return tuple(math.ceil(sum(len(m["content"]) for m in item.prompt) / CHARACTERS_PER_TOKEN) for item in items)
    return tuple(len(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
                 for item in items)[: config.gate.max_examples]


def split_counts(config: KwanzaaConfig, source) -> tuple[SplitCounts, SplitCounts, bool, object]:
    """Token counts of the train and eval splits as training tokenizes them (`True`, with the
    tokenizer), or estimated from their characters when the tokenizer cannot be had without a
    download (`False`, None)."""
    from kwanzaa_adapter.data.tokenization import tokenize_file
    from kwanzaa_adapter.data.validation import load_examples

    try:
        if source.kind == "hub":
            raise sources.ModelReferenceError("a hub tokenizer may need a download")
        tokenizer = loading.load_tokenizer(sources.materialize(source), config)
    except (sources.ModelReferenceError, OSError) as exc:
        log.info("counting tokens from characters: %s", exc)
        splits = []
        for path in (config.data.train_file, config.data.eval_file):
            rows = []
            for example in load_examples(path, config.data.system_prompt):
                chars = [len(m["content"]) for m in example.messages]
                answer = sum(n for n, m in zip(chars, example.messages) if m["role"] == "assistant")
                rows.append((min(math.ceil(sum(chars) / CHARACTERS_PER_TOKEN), config.data.max_seq_length),
                             math.ceil(answer / CHARACTERS_PER_TOKEN)))
            splits.append(SplitCounts(tuple(rows)))
        return splits[0], splits[1], False, None
    train, evaluation = (tokenize_file(path, tokenizer, config.data.max_seq_length,
                                       system_prompt=config.data.system_prompt,
                                       cache_dir=sources.cache_root() / "tokenized")[0]
                         for path in (config.data.train_file, config.data.eval_file))
    train_counts, eval_counts = (SplitCounts(tuple((len(e.input_ids), e.supervised_tokens) for e in examples))
                                 for examples in (train, evaluation))
    # The fast engine pre-fills a beginning that prompts share once (the same documents, other questions).
    prompts = [list(e.input_ids[: len(e.input_ids) - e.supervised_tokens]) for e in evaluation]
    prompts = prompts[: config.evaluation.max_examples] if config.evaluation.max_examples else prompts
    eval_counts = replace(eval_counts, copied=copied_tokens(prompts, config.evaluation.batch_size))
    return train_counts, eval_counts, True, tokenizer


def time_estimate(config: KwanzaaConfig, arch: ArchitectureConfig, train: SplitCounts, evaluation: SplitCounts,
                  precision: PrecisionDecision, checkpointing: bool, gate_prompts: tuple[int, ...] = ()
                  ) -> TimeEstimate | None:
    """The wall-time estimate over this machine's measured product rate in the resolved precision."""
    import torch

    # The rate is measured now (about 0.1 s), never read from the probe cache: the bf16-or-not decision a
    # cached probe makes holds for the machine, but its speed moves (a cached rate missed by 2.17x).
    peak = precision.peak_flops if precision.probe is not None and not precision.probe_cached else None
    if peak is None:
        device = precision.device
        if device == "cuda" and not torch.cuda.is_available():
            return None
        probe = measure_products(probe_shape(arch.hidden_size, arch.intermediate_size), (precision.resolved,),
                                 device=device)
        peak = probe.peak(precision.resolved) * 1e9
    from kwanzaa_adapter.training.gate_fitting import candidate_layers

    depth = max(candidate_layers(config.gate.layers, arch.num_hidden_layers)) if gate_prompts else None
    # The behavioral evaluation runs on llama.cpp where inference.engine lets it and the engine is built.
    import importlib.util

    fast = (config.inference.engine != "reference" and precision.device == "cpu"
            and importlib.util.find_spec("llama_cpp") is not None)
    from kwanzaa_adapter.training.read_outs import evidence_depth

    reads = evidence_depth(config, arch.num_hidden_layers) \
        if config.evidence.fit and config.evidence.apply != "none" else None
    return estimate_time(config, arch, train, evaluation, peak, precision.resolved, checkpointing,
                         gate_prompts=gate_prompts, gate_depth=depth, fast_engine=fast, evidence_depth=reads)


def preference_plan(config: KwanzaaConfig) -> str:
    """The dry run's line on training.preference; its time is not in the estimate (it depends on the
    pairs the supervised adapter's errors give)."""
    p = config.training.preference
    if not p.enabled:
        return "off"
    near = f", near-miss pairs from {p.near_miss_file}" if p.near_miss_file else ""
    return (f"DPO, beta {p.beta}, {p.rounds} round(s) mining {p.mining_examples} training examples{near}, "
            f"{p.num_epochs} epoch(s) at lr {p.learning_rate}; not in the time estimate below")


def format_plan(config: KwanzaaConfig, source, arch: ArchitectureConfig, arch_origin: str, train_rows: int,
                eval_rows: int, device: str, precision: PrecisionDecision, checkpointing: bool) -> str:
    t, a, q = config.training, config.adapter, config.quantization
    adapted = adapted_layers(config, arch)
    lora, _ = adapter_parameter_count(arch, a.r, list(a.target_modules), adapted)
    per_epoch = steps_per_epoch(train_rows, config)
    total_steps = t.max_steps if t.max_steps > 0 else math.ceil(per_epoch * t.num_epochs)
    est = estimate_memory(config, arch, device, checkpointing, precision.resolved)
    quant = (f"4-bit {q.quant_type}{' + double quant' if q.double_quant else ''}, compute {precision.resolved}"
             if q.load_in_4bit else f"none ({precision.resolved} weights)")
    blocks = f"the last {adapted} of {arch.num_hidden_layers} blocks" if adapted < arch.num_hidden_layers \
        else f"all {arch.num_hidden_layers} blocks"
    lines = [
        f"Plan for run '{config.run.name}' v{config.run.version} (config digest {config.digest()[:12]})",
        f"  base model      {config.model.name_or_path} [{source.kind}]"
        + (f" -> {source.path}" if source.path else "") + f"  (family {config.model.family})",
        f"  shape           {arch.num_parameters / 1e9:.3f}B params, {arch.num_hidden_layers} layers, "
        f"width {arch.hidden_size}, vocab {arch.vocab_size}  ({arch_origin})",
        f"  {precision.describe()}",
        f"  quantization    {quant}",
        f"  adapter         LoRA r={a.r} alpha={a.alpha} dropout={a.dropout} on {', '.join(a.target_modules)} of "
        f"{blocks} = {lora / 1e6:.2f}M trainable params ({100 * lora / arch.num_parameters:.2f}%)",
        f"  data            {train_rows} train rows, {eval_rows} eval rows, max {config.data.max_seq_length} "
        f"tokens, {config.data.batching}",
        f"  batch           {t.per_device_batch_size} per device x {t.gradient_accumulation_steps} accumulation "
        f"= effective {t.per_device_batch_size * t.gradient_accumulation_steps}",
        f"  schedule        {per_epoch} steps/epoch x {t.num_epochs} epochs = {total_steps} steps, "
        f"lr {t.learning_rate} "
        f"{t.lr_scheduler}, warmup {t.warmup_ratio}",
        f"  optimizer       {t.optimizer}, clip {t.max_grad_norm}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}{' (auto)' if t.gradient_checkpointing == 'auto' else ''}, "
        f"device {device}",
        f"  preference      {preference_plan(config)}",
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
