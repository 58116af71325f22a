"""Training throughput: this project against the standard TRL SFTTrainer + PEFT + bitsandbytes QLoRA recipe.

    pip install -e '.[bench]'
    python bench/throughput.py                  # 3 rounds of ours, TRL, tuned TRL on the first 64 train rows
    python bench/throughput.py --samples 223    # the whole shipped train set once per run (56 steps)
    python bench/throughput.py --repeats 1 --samples 32     # a quick look (8 optimizer steps per run)
    python bench/throughput.py --only ours --set data.batching=length_grouped   # measure one lever

Three sides train the demo workload (configs/demo.yaml: SmolLM2-135M-Instruct, 4-bit NF4 + double
quant, LoRA r/alpha/targets of configs/qlora.yaml) on the same first `--samples` rows of the
shipped training data, with the same max sequence length, effective batch, learning-rate
schedule and seed, one after the other, each run in its own subprocess (so peak RSS is per run):
ours runs `train_adapter()`, the workflow users run (behavioral evaluation off); "trl" runs
`SFTTrainer` at `SFTConfig` defaults except for what must be equal (see bench/NOTES.md); "trl
tuned" is the same with gradient checkpointing off (the LoRA dropout is already ours on both).
Every side runs in the precision this CPU multiplies fast (`model.precision: auto`, measured by
the probe of modeling/precision.py): bf16 where AVX512-BF16/AMX make it clearly faster, else fp32, TRL's
bf16 default included. The rounds are interleaved (ours, trl, trl tuned, ours, ...) and each
figure is the median of `--repeats` runs with its spread (min-max).

Measured per run: supervised tokens/s and real (non-padding) tokens/s over the Trainer's
training loop, the process's wall time until the trained adapter exists, peak RSS (VmHWM),
and the final loss: the mean assistant-token loss on the first `--eval-rows` rows of
data/kwanzaa_eval.jsonl, computed by the same function for all. The parent also measures the
matrix-product peak in the resolved precision (for the model FLOPs utilisation), the
checksum/hashlib ratio (bench/hash_throughput.py) and the batched/one-at-a-time generation ratio
(bench/eval_generation.py). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
TRAIN_FILE = ROOT / "data" / "kwanzaa_train.jsonl"
EVAL_FILE = ROOT / "data" / "kwanzaa_eval.jsonl"
IGNORE_INDEX = -100
TARGETS = {"ratio": 1.5, "loss_tolerance": 0.02, "hash_ratio": 0.8, "batched_gen_ratio": 3.0}
SIDES = ("ours", "trl", "trl_tuned")
LABELS = {"ours": "ours", "trl": "TRL", "trl_tuned": "TRL tuned"}
SUMMARY_KEYS = ("cpu_class", "precision", "peak_tflops", "runs", "ours_real_tok_s", "trl_real_tok_s",
                "trl_tuned_real_tok_s", "ratio", "ratio_tuned", "real_tok_s_spread", "ours_peak_rss_mb",
                "trl_peak_rss_mb", "trl_tuned_peak_rss_mb", "ours_final_loss", "trl_final_loss",
                "trl_tuned_final_loss", "hash_ratio", "batched_gen_ratio", "mfu")


# --------------------------------------------------------------------------- pure parts (unit-tested)


def lora_parameter_count(shapes: dict[str, tuple[int, int]], targets: list[str], r: int, layers: int) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def training_flops(*, block_linear_params: int, lora_params: int, layers: int, hidden: int, vocab: int,
                   real_tokens: int, supervised_tokens: int, sum_squared_lengths: int) -> float:
    """Model FLOPs of LoRA training on a frozen base, for the work the objective needs.

    Per real token: 2 N (forward) + 2 N (input gradients; a frozen base computes no weight
    gradients) over the block projections, and 6 per LoRA parameter (forward, input and weight
    gradients). The tied vocabulary head only where a label is supervised: 2 V h forward + 2 V h
    backward. Causal attention, QK^T and AV, half the square: 2 T^2 h per layer forward, x3 for
    training. Recomputation (gradient checkpointing) is not model work and is not counted.
    """
    per_token = 4 * block_linear_params + 6 * lora_params
    head = 4 * vocab * hidden * supervised_tokens
    attention = 3 * 2 * layers * hidden * sum_squared_lengths
    return float(per_token * real_tokens + head + attention)


def sequence_lengths(input_ids_shape: tuple[int, int], attention_mask=None, position_ids=None) -> list[int]:
    """Real lengths of the samples in a batch: attention-mask row sums, or segments of packed position_ids."""
    if attention_mask is not None:
        return [int(n) for n in attention_mask.sum(dim=1).tolist()]
    if position_ids is not None:
        lengths = []
        for row in position_ids.tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
        return lengths
    rows, width = input_ids_shape
    return [width] * rows


def side_metrics(result: dict, peak_flops: float) -> dict:
    """Rates of one side's raw counts: tokens/s over the training loop, model FLOP/s and MFU."""
    seconds = result["train_seconds"]
    flops = training_flops(**result["flops_inputs"])
    return {
        "supervised_tok_s": result["supervised_tokens"] / seconds,
        "real_tok_s": result["real_tokens"] / seconds,
        "model_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
    }


def median_run(runs: list[dict], peak_flops: float) -> dict:
    """Medians over one side's runs of its rates and measurements, with the real tokens/s spread."""
    metrics = [side_metrics(run, peak_flops) for run in runs]
    rates = [m["real_tok_s"] for m in metrics]
    return {
        "real_tok_s": statistics.median(rates),
        "real_tok_s_spread": [min(rates), max(rates)],
        "supervised_tok_s": statistics.median(m["supervised_tok_s"] for m in metrics),
        "model_tflops": statistics.median(m["model_tflops"] for m in metrics),
        "mfu": statistics.median(m["mfu"] for m in metrics) if peak_flops else None,
        "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        "final_loss": statistics.median(run["final_loss"] for run in runs),
        "train_seconds": statistics.median(run["train_seconds"] for run in runs),
        "wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
        "train_loss": statistics.median(run["train_loss"] for run in runs) if all(
            run.get("train_loss") is not None for run in runs) else None,
        "real_tokens": runs[0]["real_tokens"], "supervised_tokens": runs[0]["supervised_tokens"],
        "steps": runs[0]["steps"], "runs": len(runs),
    }


def summarize(results: dict[str, list[dict]], peak_flops: float, machine: dict, hash_ratio: float | None,
              batched_gen_ratio: float | None) -> dict:
    """The final JSON object (keys in SUMMARY_KEYS order): medians of every side's runs, and their spreads.

    `machine`: {"cpu_class", "precision"} as the parent resolved them.
    """
    m = {side: median_run(runs, peak_flops) for side, runs in results.items()}
    return {
        "cpu_class": machine["cpu_class"],
        "precision": machine["precision"],
        "peak_tflops": round(peak_flops / 1e12, 3),
        "runs": min(len(runs) for runs in results.values()),
        "ours_real_tok_s": round(m["ours"]["real_tok_s"], 1),
        "trl_real_tok_s": round(m["trl"]["real_tok_s"], 1),
        "trl_tuned_real_tok_s": round(m["trl_tuned"]["real_tok_s"], 1),
        "ratio": round(m["ours"]["real_tok_s"] / m["trl"]["real_tok_s"], 3),
        "ratio_tuned": round(m["ours"]["real_tok_s"] / m["trl_tuned"]["real_tok_s"], 3),
        "real_tok_s_spread": {side: [round(v, 1) for v in m[side]["real_tok_s_spread"]] for side in m},
        "ours_peak_rss_mb": round(m["ours"]["peak_rss_mb"], 1),
        "trl_peak_rss_mb": round(m["trl"]["peak_rss_mb"], 1),
        "trl_tuned_peak_rss_mb": round(m["trl_tuned"]["peak_rss_mb"], 1),
        "ours_final_loss": round(m["ours"]["final_loss"], 4),
        "trl_final_loss": round(m["trl"]["final_loss"], 4),
        "trl_tuned_final_loss": round(m["trl_tuned"]["final_loss"], 4),
        "hash_ratio": None if hash_ratio is None else round(hash_ratio, 3),
        "batched_gen_ratio": None if batched_gen_ratio is None else round(batched_gen_ratio, 2),
        "mfu": None if m["ours"]["mfu"] is None else round(m["ours"]["mfu"], 4),
    }


def target_checks(summary: dict) -> dict[str, bool | None]:
    """Each target: met (True), missed (False) or not measured (None), against TRL's defaults and tuned TRL."""
    def check(value, test):
        return None if value is None else bool(test(value))

    checks = {}
    for side, ratio in (("TRL", "ratio"), ("TRL tuned", "ratio_tuned")):
        key = side.lower().replace(" ", "_")
        checks[f"real tokens/s ratio to {side} >= {TARGETS['ratio']}"] = summary[ratio] >= TARGETS["ratio"]
        checks[f"peak RSS ours <= {side}"] = summary["ours_peak_rss_mb"] <= summary[f"{key}_peak_rss_mb"]
        checks[f"final loss ours <= {side} x {1 + TARGETS['loss_tolerance']}"] = (
            summary["ours_final_loss"] <= summary[f"{key}_final_loss"] * (1 + TARGETS["loss_tolerance"]))
    checks[f"hash ratio >= {TARGETS['hash_ratio']}"] = check(summary["hash_ratio"],
                                                             lambda v: v >= TARGETS["hash_ratio"])
    checks[f"batched generation >= {TARGETS['batched_gen_ratio']:.0f}x"] = check(
        summary["batched_gen_ratio"], lambda v: v >= TARGETS["batched_gen_ratio"])
    return checks


def format_table(results: dict[str, list[dict]], peak_flops: float) -> str:
    """Side-by-side table of the medians, the real tokens/s spread, and ours/TRL ratios."""
    m = {side: median_run(runs, peak_flops) for side, runs in results.items()}
    sides = list(m)
    rows = [
        ("supervised tokens/s", "supervised_tok_s", "{:.1f}"),
        ("real tokens/s", "real_tok_s", "{:.1f}"),
        ("training loop, s (eval passes excluded)", "train_seconds", "{:.1f}"),
        ("wall time, s", "wall_seconds", "{:.1f}"),
        ("peak RSS, MB", "peak_rss_mb", "{:.0f}"),
        ("final loss (eval, assistant tokens)", "final_loss", "{:.4f}"),
        ("train loss (Trainer's last logged)", "train_loss", "{:.4f}"),
        ("model TFLOP/s", "model_tflops", "{:.3f}"),
        ("MFU (of the measured peak)", "mfu", "{:.2%}"),
        ("real tokens", "real_tokens", "{:d}"),
        ("supervised tokens", "supervised_tokens", "{:d}"),
        ("optimizer steps", "steps", "{:d}"),
        ("runs", "runs", "{:d}"),
    ]
    header = ("metric (median of runs)", *(LABELS[s] for s in sides), *(f"ours/{LABELS[s]}" for s in sides[1:]))
    lines = [header]
    for name, key, fmt in rows:
        values = [m[side][key] for side in sides]
        cells = [name, *(_fmt(fmt, v) for v in values)]
        for other in values[1:]:
            numeric = isinstance(values[0], (int, float)) and isinstance(other, (int, float)) and other
            cells.append(f"{values[0] / other:.2f}x" if numeric else "-")
        lines.append(tuple(cells))
    spread = ["real tokens/s min-max", *(f"{a:.1f}-{b:.1f}" for a, b in (m[s]["real_tok_s_spread"] for s in sides))]
    lines.append(tuple(spread + ["-"] * (len(header) - len(spread))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


# --------------------------------------------------------------------------- measurements in the parent


def matmul_peak(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` square products in `dtype` on the CPU (the MFU denominator).

    Measured in the resolved precision only: an emulated bf16 kernel would take 20 s per product.
    """
    import torch

    a = torch.randn(size, size).to(getattr(torch, dtype))
    b = torch.randn(size, size).to(getattr(torch, dtype))
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def machine_precision(config_path: Path, overrides: list[str]) -> dict:
    """The config's model.precision resolved on this CPU, the probe behind it, and the CPU class it implies."""
    from kwanzaa_adapter.modeling import loading as modeling
    from kwanzaa_adapter.modeling import sources as model_sources
    from kwanzaa_adapter.modeling.precision import FAST_FACTOR, machine_identity

    config = load_config(config_path, overrides)
    decision = modeling.run_precision(config, "cpu")
    identity = machine_identity()
    probe = decision.probe
    if probe is None or "bfloat16" not in probe.gflops:  # an explicit fp32 measures nothing; ask the probe
        from kwanzaa_adapter.modeling.precision import cached_probe, probe_shape

        arch, _ = modeling.resolve_architecture(config, model_sources.resolve_model_reference(config.model.name_or_path))
        probe, _ = cached_probe(probe_shape(arch.hidden_size, arch.intermediate_size), ("float32", "bfloat16"),
                                model_sources.cache_root() / "precision")
    fast = probe.speedup("bfloat16") >= FAST_FACTOR
    restricted = f", kernels limited by {identity['isa_environment']}" if identity["isa_environment"] else ""
    cpu_class = (f"{'bf16-fast (AVX512-BF16/AMX)' if fast else 'AVX2 (bf16 emulated)'}: {identity['cpu']}, "
                 f"ATen {identity['capability']}{restricted}, {identity['threads']} threads")
    return {"precision": decision.resolved, "cpu_class": cpu_class, "probe": probe.as_json(),
            "reason": decision.reason}


def write_subsets(work: Path, samples: int | None, eval_rows: int) -> tuple[Path, Path, int]:
    """The first `samples` train rows and `eval_rows` eval rows, as JSONL files both sides read."""
    train_lines = TRAIN_FILE.read_text().splitlines()
    train_lines = [line for line in train_lines if line.strip()][: samples or None]
    eval_lines = [line for line in EVAL_FILE.read_text().splitlines() if line.strip()][:eval_rows]
    train, evaluation = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("\n".join(train_lines) + "\n")
    evaluation.write_text("\n".join(eval_lines) + "\n")
    return train, evaluation, len(train_lines)


def run_side(side: str, work: Path, args, precision: str, round_: int) -> dict:
    """One trainer in its own process, in `precision`; returns the JSON it wrote."""
    out = work / f"{side}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--workdir", str(work),
               "--config", str(args.config)]
    for override in [*args.set, f"model.precision={precision}"]:
        command += ["--set", override]
    print(f"\n=== {side} (round {round_}): training {args.samples} samples in {precision} "
          f"(load average {os.getloadavg()[0]:.1f}) ===", flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    print(f"=== {side}: done in {time.perf_counter() - started:.0f} s ===", flush=True)
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the child: one trainer


class _Counter:
    """Tokens of every micro-batch the Trainer trains on, counted from its inputs, and the time
    spent in evaluation passes (ours evaluates at its last step; TRL by default never), which the
    training-loop time excludes."""

    def __init__(self):
        self.real = self.supervised = self.sum_squares = self.batches = 0
        self.eval_seconds = 0.0

    def install(self):
        from transformers import Trainer

        training_step, evaluate, counter = Trainer.training_step, Trainer.evaluate, self

        def counted_step(trainer, model, inputs, *args, **kwargs):
            counter.add(inputs)
            return training_step(trainer, model, inputs, *args, **kwargs)

        def timed_evaluate(trainer, *args, **kwargs):
            started = time.perf_counter()
            try:
                return evaluate(trainer, *args, **kwargs)
            finally:
                counter.eval_seconds += time.perf_counter() - started

        # bench instrumentation, both sides alike
        Trainer.training_step, Trainer.evaluate = counted_step, timed_evaluate

    def add(self, inputs):
        ids = inputs["input_ids"]
        lengths = sequence_lengths(tuple(ids.shape), inputs.get("attention_mask"), inputs.get("position_ids"))
        self.real += sum(lengths)
        self.sum_squares += sum(n * n for n in lengths)
        self.supervised += int((inputs["labels"] != IGNORE_INDEX).sum())
        self.batches += 1


def _probe_callback():
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        """Times the training loop and keeps the trained model and tokenizer."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.rss_before_train_mb = peak_rss_mb()
            self.eval_before = self.counter.eval_seconds
            self.started = time.perf_counter()

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            self.loop_seconds = time.perf_counter() - self.started
            self.eval_seconds_in_loop = self.counter.eval_seconds - self.eval_before
            self.rss_after_train_mb = peak_rss_mb()
            self.model, self.tokenizer, self.steps = model, processing_class, state.global_step
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.train_loss = losses[-1] if losses else None

    return Probe()


def assistant_token_loss(model, tokenizer, eval_file: Path, max_seq_length: int, precision: str) -> float:
    """Mean cross-entropy over the assistant tokens of every eval row (same function for every side), with
    bf16 autocast where the run trained in bf16."""
    import torch
    import torch.nn.functional as F

    from kwanzaa_adapter.data.chat_template import tokenize_conversation
    from kwanzaa_adapter.data.validation import load_examples
    from kwanzaa_adapter.modeling.loading import keep_4bit_layout_fixed

    keep_4bit_layout_fixed(model)  # the eval-mode CPU kernel would repack the 4-bit weights
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        for example in load_examples(eval_file):
            tokens = tokenize_conversation(example.messages, tokenizer, max_seq_length)
            ids = torch.tensor([tokens.input_ids])
            targets = torch.tensor(tokens.labels[1:])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            total += float(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def peak_rss_mb() -> float:
    """VmHWM of this process, in MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6


def load_config(config_path: Path, overrides: list[str]):
    from kwanzaa_adapter.config import load_training_config

    return load_training_config(config_path, overrides)


def train_ours(work: Path, config_path: Path, overrides: list[str], probe) -> dict:
    """This project's workflow, as `kwanzaa-adapter train` runs it (behavioral evaluation off)."""
    from kwanzaa_adapter.training.workflow import train_adapter

    result = train_adapter(config_path, tuple(overrides), output_dir=str(work / "ours-out"), callbacks=(probe,))
    return {"artifact": str(result.artifact_dir), "config_eval_loss": result.summary.get("final_eval_loss")}


def train_trl(work: Path, config_path: Path, overrides: list[str], probe, tuned: bool = False,
              device: str = "cpu") -> dict:
    """The standard recipe: bitsandbytes 4-bit model, PEFT LoraConfig, TRL SFTTrainer at SFTConfig defaults.

    Set to equal ours: data (the same rows, as prompt-completion conversations, so TRL's default
    completion-only loss trains the same assistant tokens), quantization, LoRA (dropout included),
    max length, batch per device and accumulation, learning-rate schedule, epochs, seed, and the
    precision (bf16 autocast only where this CPU runs bf16 fast; TRL's default is bf16 on). Everything
    else is TRL's default: gradient checkpointing on (off when `tuned`), padding to the longest in the
    batch, no packing, its fused chunked LM-head loss with entropy and token-accuracy metrics.
    `device`: where the model loads and trains (bench/gpu_check.py runs this recipe on a GPU).
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kwanzaa_adapter.data.validation import load_examples
    from kwanzaa_adapter.modeling import loading as modeling
    from kwanzaa_adapter.modeling import sources as model_sources
    from kwanzaa_adapter.training.trainer import schedule_arguments

    config = load_config(config_path, overrides)
    precision = config.model.precision  # set by the parent to the resolved one
    location = model_sources.materialize(model_sources.resolve_model_reference(config.model.name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(
        location, quantization_config=modeling.quantization_config(config, precision), dtype=getattr(torch, precision),
        attn_implementation=config.model.attn_implementation, device_map={"": device})
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]}
            for e in load_examples(config.data.train_file)]
    args = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_length=config.data.max_seq_length,
        **schedule_arguments(config),  # the same batch, schedule and seed as ours; the rest TRL's defaults
        use_cpu=device == "cpu",
        bf16=precision == "bfloat16",
        report_to="none",
        **({"gradient_checkpointing": False} if tuned else {}),
    )
    lora = modeling.lora_config(config, modeling.decoder_block_count(model))
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora, callbacks=[probe])
    trainer.train()
    return {"trl_settings": {"gradient_checkpointing": args.gradient_checkpointing, "bf16": args.bf16,
                             "packing": args.packing, "padding_free": args.padding_free,
                             "completion_only_loss": args.completion_only_loss,
                             "assistant_only_loss": args.assistant_only_loss, "optim": str(args.optim),
                             "logging_steps": args.logging_steps}}


def child(side: str, work: Path, config_path: Path, overrides: list[str]) -> None:
    started = time.perf_counter()
    overrides = [f"data.train_file={work / 'train.jsonl'}", f"data.eval_file={work / 'eval.jsonl'}",
                 "evaluation.behavioral=false", "training.num_epochs=1", *overrides]  # one pass over the samples
    counter, probe = _Counter(), _probe_callback()
    counter.install()
    probe.counter = counter
    if side == "ours":
        extra = train_ours(work, config_path, overrides, probe)
    else:
        extra = train_trl(work, config_path, overrides, probe, tuned=side == "trl_tuned")
    wall = time.perf_counter() - started

    from kwanzaa_adapter.modeling.planning import linear_shapes

    config = load_config(config_path, overrides)
    model_config = probe.model.config
    arch = type("Arch", (), dict(hidden_size=model_config.hidden_size,
                                 intermediate_size=model_config.intermediate_size,
                                 num_key_value_heads=model_config.num_key_value_heads,
                                 num_attention_heads=model_config.num_attention_heads))
    shapes = linear_shapes(arch)
    layers = model_config.num_hidden_layers
    lora = sum(p.numel() for p in probe.model.parameters() if p.requires_grad)
    final_loss = assistant_token_loss(probe.model, probe.tokenizer, work / "eval.jsonl", config.data.max_seq_length,
                                      config.model.precision)
    result = {
        "side": side,
        "train_seconds": probe.loop_seconds - probe.eval_seconds_in_loop,
        "eval_seconds_in_loop": probe.eval_seconds_in_loop,
        "wall_seconds": wall,
        "steps": probe.steps,
        "micro_batches": counter.batches,
        "real_tokens": counter.real,
        "supervised_tokens": counter.supervised,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_before_train_mb": probe.rss_before_train_mb,
        "peak_rss_after_train_mb": probe.rss_after_train_mb,
        "load_average": os.getloadavg(),
        "final_loss": final_loss,
        "train_loss": probe.train_loss,
        "lora_parameters": lora,
        "flops_inputs": {
            "block_linear_params": layers * sum(i * o for i, o in shapes.values()),
            "lora_params": lora, "layers": layers, "hidden": model_config.hidden_size,
            "vocab": model_config.vocab_size, "real_tokens": counter.real,
            "supervised_tokens": counter.supervised, "sum_squared_lengths": counter.sum_squares,
        },
        "overrides": overrides,
        **extra,
    }
    (work / f"{side}.json").write_text(json.dumps(result, indent=2))


# --------------------------------------------------------------------------- main


def auxiliary_measurements(args, ours: dict | None) -> tuple[float, float | None]:
    """The checksum/hashlib ratio, and batched/one-at-a-time generation with the adapter ours just trained
    on its 4-bit base (what evaluation generates with), over the first eval prompts."""
    import eval_generation
    import hash_throughput

    hashing = hash_throughput.measure(3, args.config)
    print(f"hashing: checksum {hashing['checksum_mb_s']} MB/s vs hashlib {hashing['hashlib_mb_s']} MB/s")
    if ours is None:
        return hashing["ratio"], None
    model, tokenizer = eval_generation.load_adapter_model(args.config, Path(ours["artifact"]), "cpu",
                                                          tuple(args.set))
    gen = eval_generation.measure(n=args.gen_prompts, max_new_tokens=args.gen_max_new_tokens,
                                  batch_size=args.gen_prompts, model=model, tokenizer=tokenizer)
    print(f"generation (trained adapter, 4-bit base): batched {gen['batched_tokens_per_second']} tokens/s vs "
          f"one at a time {gen['single_tokens_per_second']} tokens/s ({gen['prompts']} prompts, "
          f"{gen['batched_tokens']} and {gen['single_tokens']} new tokens)")
    return hashing["ratio"], gen["speedup"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 64 rows (16 optimizer steps, ~30k tokens per run) x 3 sides x 3 rounds keep the whole bench near
    # 25 minutes on a quiet 2-core machine with fast bf16.
    parser.add_argument("--samples", type=int, default=64,
                        help="train rows per run, the first N of data/kwanzaa_train.jsonl (default 64; 223 = all)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved (default 3)")
    parser.add_argument("--eval-rows", type=int, default=16, help="eval rows for the final loss (default 16)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of our config (every side reads the shared fields from it)")
    parser.add_argument("--only", choices=SIDES, help="train one side only (to measure a lever)")
    parser.add_argument("--skip-aux", action="store_true", help="skip the hashing and generation measurements")
    parser.add_argument("--gen-prompts", type=int, default=8)
    parser.add_argument("--gen-max-new-tokens", type=int, default=48)
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.workdir, args.config, args.set)
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    started = time.perf_counter()
    machine = machine_precision(args.config, args.set)
    print(f"CPU class {machine['cpu_class']}\nprecision {machine['precision']} ({machine['reason']}); "
          f"probe {machine['probe']}")
    with tempfile.TemporaryDirectory(prefix="kwanzaa-throughput-") as tmp:
        work = Path(tmp)
        _, _, rows = write_subsets(work, args.samples, args.eval_rows)
        print(f"{rows} train rows, {args.eval_rows} eval rows, config {args.config}, {os.cpu_count()} CPUs")
        peak = matmul_peak(machine["precision"])
        print(f"measured {machine['precision']} matmul peak: {peak / 1e12:.3f} TFLOP/s")
        sides = [side for side in SIDES if args.only in (None, side)]
        results: dict[str, list[dict]] = {side: [] for side in sides}
        for round_ in range(1, args.repeats + 1):
            for side in sides:
                results[side].append(run_side(side, work, args, machine["precision"], round_))
        peak = max(peak, matmul_peak(machine["precision"]))  # again after training: the best of the two
        hash_ratio = gen_ratio = None
        if not args.skip_aux:
            hash_ratio, gen_ratio = auxiliary_measurements(args, results.get("ours", [None])[-1])
    if args.only:
        for side, runs in results.items():
            medians = median_run(runs, peak)
            print(json.dumps({"side": side, "precision": machine["precision"], "overrides": args.set,
                              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in medians.items()}}))
        return 0
    print(f"\n{machine['precision']} matmul peak {peak / 1e12:.3f} TFLOP/s; {rows} samples per run, "
          f"{args.repeats} runs per side; total bench time {(time.perf_counter() - started) / 60:.1f} min")
    print(format_table(results, peak))
    summary = summarize(results, peak, machine, hash_ratio, gen_ratio)
    for name, ok in target_checks(summary).items():
        print(f"  [{'met' if ok else 'not measured' if ok is None else 'MISSED'}] {name}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
