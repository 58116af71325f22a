"""Training throughput: this project against the standard TRL SFTTrainer + PEFT + bitsandbytes QLoRA recipe.

    pip install -e '.[bench]'
    python bench/throughput.py                  # the comparison on the first 96 train rows (24 steps)
    python bench/throughput.py --samples 223    # the whole shipped train set once (56 steps)
    python bench/throughput.py --samples 32     # a quick run (8 optimizer steps per side)
    python bench/throughput.py --only ours --set data.batching=length_grouped   # measure one lever

Both sides train the demo workload (configs/demo.yaml: SmolLM2-135M-Instruct, 4-bit NF4 + double
quant, LoRA r/alpha/targets of configs/qlora.yaml) on the same first `--samples` rows of the
shipped training data, with the same max sequence length, effective batch, learning-rate
schedule and seed, one after the other, each in its own subprocess (so peak RSS is per side).
Ours runs `train_adapter()`, the workflow users run (behavioral evaluation off); TRL runs
`SFTTrainer` at `SFTConfig` defaults except for what must be equal (see bench/NOTES.md).

Measured per side: supervised tokens/s and real (non-padding) tokens/s over the Trainer's
training loop, the process's wall time until the trained adapter exists, peak RSS (VmHWM),
and the final loss: the mean assistant-token loss on the first `--eval-rows` rows of
data/kwanzaa_eval.jsonl, computed by the same function for both. The parent also measures the
bf16 matrix-multiply peak (for the model FLOPs utilisation), the checksum/hashlib ratio
(bench/hash_throughput.py) and the batched/one-at-a-time generation ratio
(bench/eval_generation.py). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
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
SIDES = ("ours", "trl")
SUMMARY_KEYS = ("ours_real_tok_s", "trl_real_tok_s", "ratio", "ours_peak_rss_mb", "trl_peak_rss_mb",
                "ours_final_loss", "trl_final_loss", "hash_ratio", "batched_gen_ratio", "mfu")


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


def summarize(ours: dict, trl: dict, peak_flops: float, hash_ratio: float | None,
              batched_gen_ratio: float | None) -> dict:
    """The final JSON object (keys in SUMMARY_KEYS order)."""
    o, t = side_metrics(ours, peak_flops), side_metrics(trl, peak_flops)
    return {
        "ours_real_tok_s": round(o["real_tok_s"], 1),
        "trl_real_tok_s": round(t["real_tok_s"], 1),
        "ratio": round(o["real_tok_s"] / t["real_tok_s"], 3),
        "ours_peak_rss_mb": round(ours["peak_rss_mb"], 1),
        "trl_peak_rss_mb": round(trl["peak_rss_mb"], 1),
        "ours_final_loss": round(ours["final_loss"], 4),
        "trl_final_loss": round(trl["final_loss"], 4),
        "hash_ratio": None if hash_ratio is None else round(hash_ratio, 3),
        "batched_gen_ratio": None if batched_gen_ratio is None else round(batched_gen_ratio, 2),
        "mfu": None if o["mfu"] is None else round(o["mfu"], 4),
    }


def target_checks(summary: dict) -> dict[str, bool | None]:
    """Each target of issue 9: met (True), missed (False) or not measured (None)."""
    def check(value, test):
        return None if value is None else bool(test(value))

    return {
        f"real tokens/s ratio >= {TARGETS['ratio']}": check(summary["ratio"], lambda v: v >= TARGETS["ratio"]),
        "peak RSS ours <= TRL": summary["ours_peak_rss_mb"] <= summary["trl_peak_rss_mb"],
        f"final loss ours <= TRL x {1 + TARGETS['loss_tolerance']}":
            summary["ours_final_loss"] <= summary["trl_final_loss"] * (1 + TARGETS["loss_tolerance"]),
        f"hash ratio >= {TARGETS['hash_ratio']}": check(summary["hash_ratio"], lambda v: v >= TARGETS["hash_ratio"]),
        f"batched generation >= {TARGETS['batched_gen_ratio']:.0f}x":
            check(summary["batched_gen_ratio"], lambda v: v >= TARGETS["batched_gen_ratio"]),
    }


def format_table(ours: dict, trl: dict, peak_flops: float) -> str:
    """Side-by-side table of the two runs, with ours/TRL ratios."""
    o, t = side_metrics(ours, peak_flops), side_metrics(trl, peak_flops)
    rows = [
        ("supervised tokens/s", o["supervised_tok_s"], t["supervised_tok_s"], "{:.1f}"),
        ("real tokens/s", o["real_tok_s"], t["real_tok_s"], "{:.1f}"),
        ("training loop, s (eval passes excluded)", ours["train_seconds"], trl["train_seconds"], "{:.1f}"),
        ("wall time, s", ours["wall_seconds"], trl["wall_seconds"], "{:.1f}"),
        ("peak RSS, MB", ours["peak_rss_mb"], trl["peak_rss_mb"], "{:.0f}"),
        ("final loss (eval, assistant tokens)", ours["final_loss"], trl["final_loss"], "{:.4f}"),
        ("train loss (Trainer's last logged)", ours.get("train_loss"), trl.get("train_loss"), "{:.4f}"),
        ("model TFLOP/s", o["model_tflops"], t["model_tflops"], "{:.3f}"),
        ("MFU (of measured bf16 peak)", o["mfu"], t["mfu"], "{:.2%}"),
        ("real tokens", ours["real_tokens"], trl["real_tokens"], "{:d}"),
        ("supervised tokens", ours["supervised_tokens"], trl["supervised_tokens"], "{:d}"),
        ("optimizer steps", ours["steps"], trl["steps"], "{:d}"),
    ]
    header = ("metric", "ours", "TRL", "ours/TRL")
    lines = [header]
    for name, a, b, fmt in rows:
        cells = [name, _fmt(fmt, a), _fmt(fmt, b)]
        cells.append(f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-")
        lines.append(tuple(cells))
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    out = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


# --------------------------------------------------------------------------- measurements in the parent


def bf16_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` bf16 square matrix products on the CPU (the MFU denominator)."""
    import torch

    a = torch.randn(size, size, dtype=torch.bfloat16)
    b = torch.randn(size, size, dtype=torch.bfloat16)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            torch.matmul(a, b)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * size**3 / best


def write_subsets(work: Path, samples: int | None, eval_rows: int) -> tuple[Path, Path, int]:
    """The first `samples` train rows and `eval_rows` eval rows, as JSONL files both sides read."""
    train_lines = TRAIN_FILE.read_text().splitlines()
    train_lines = [line for line in train_lines if line.strip()][: samples or None]
    eval_lines = [line for line in EVAL_FILE.read_text().splitlines() if line.strip()][:eval_rows]
    train, evaluation = work / "train.jsonl", work / "eval.jsonl"
    train.write_text("\n".join(train_lines) + "\n")
    evaluation.write_text("\n".join(eval_lines) + "\n")
    return train, evaluation, len(train_lines)


def run_side(side: str, work: Path, args) -> dict:
    """One trainer in its own process; returns the JSON it wrote."""
    out = work / f"{side}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--workdir", str(work),
               "--config", str(args.config)]
    for override in args.set:
        command += ["--set", override]
    print(f"\n=== {side}: training {args.samples} samples (load average {os.getloadavg()[0]:.1f}) ===", flush=True)
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


def assistant_token_loss(model, tokenizer, eval_file: Path, max_seq_length: int) -> float:
    """Mean cross-entropy over the assistant tokens of every eval row (same function for both sides)."""
    import torch
    import torch.nn.functional as F

    from kwanzaa_adapter.data.tokenization import tokenize_conversation
    from kwanzaa_adapter.data.validation import load_examples
    from kwanzaa_adapter.modeling import keep_4bit_layout_fixed

    keep_4bit_layout_fixed(model)  # the eval-mode CPU kernel would repack the 4-bit weights
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
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
    from kwanzaa_adapter.train_adapter import train_adapter

    result = train_adapter(config_path, tuple(overrides), output_dir=str(work / "ours-out"), callbacks=(probe,))
    return {"artifact": str(result.artifact_dir), "config_eval_loss": result.summary.get("final_eval_loss")}


def train_trl(work: Path, config_path: Path, overrides: list[str], probe) -> dict:
    """The standard recipe: bitsandbytes 4-bit model, PEFT LoraConfig, TRL SFTTrainer at SFTConfig defaults.

    Set to equal ours: data (the same rows, as prompt-completion conversations, so TRL's default
    completion-only loss trains the same assistant tokens), quantization, LoRA, max length, batch
    per device and accumulation, learning-rate schedule, epochs and seed. Everything else is TRL's
    default: gradient checkpointing on, bf16 on, padding to the longest in the batch, no packing,
    its fused chunked LM-head loss with entropy and token-accuracy metrics.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from kwanzaa_adapter import modeling
    from kwanzaa_adapter.data.validation import load_examples
    from kwanzaa_adapter.trainer import schedule_arguments

    config = load_config(config_path, overrides)
    location = modeling.materialize(modeling.resolve_model_reference(config.model.name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(location)
    model = AutoModelForCausalLM.from_pretrained(
        location, quantization_config=modeling.quantization_config(config), dtype=getattr(torch, config.model.dtype),
        attn_implementation=config.model.attn_implementation, device_map={"": "cpu"})
    rows = [{"prompt": e.messages[:-1], "completion": e.messages[-1:]}
            for e in load_examples(config.data.train_file)]
    args = SFTConfig(
        output_dir=str(work / "trl-out"),
        max_length=config.data.max_seq_length,
        **schedule_arguments(config),  # the same batch, schedule and seed as ours; the rest TRL's defaults
        use_cpu=True,
        report_to="none",
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=modeling.lora_config(config), callbacks=[probe])
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
    extra = (train_ours if side == "ours" else train_trl)(work, config_path, overrides, probe)
    wall = time.perf_counter() - started

    from kwanzaa_adapter.planning import linear_shapes

    config = load_config(config_path, overrides)
    model_config = probe.model.config
    arch = type("Arch", (), dict(hidden_size=model_config.hidden_size,
                                 intermediate_size=model_config.intermediate_size,
                                 num_key_value_heads=model_config.num_key_value_heads,
                                 num_attention_heads=model_config.num_attention_heads))
    shapes = linear_shapes(arch)
    layers = model_config.num_hidden_layers
    lora = sum(p.numel() for p in probe.model.parameters() if p.requires_grad)
    final_loss = assistant_token_loss(probe.model, probe.tokenizer, work / "eval.jsonl", config.data.max_seq_length)
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

    hashing = hash_throughput.measure(200, 3)
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
    # 96 rows (24 optimizer steps, ~44k tokens per side) keep the whole run near 10 minutes on a quiet
    # 2-core machine; --samples 223 (the whole set, ~103k tokens) takes about twice as long.
    parser.add_argument("--samples", type=int, default=96,
                        help="train rows per side, the first N of data/kwanzaa_train.jsonl (default 96; 223 = all)")
    parser.add_argument("--eval-rows", type=int, default=16, help="eval rows for the final loss (default 16)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override of our config (both sides read the shared fields from it)")
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
    with tempfile.TemporaryDirectory(prefix="kwanzaa-throughput-") as tmp:
        work = Path(tmp)
        _, _, rows = write_subsets(work, args.samples, args.eval_rows)
        print(f"{rows} train rows, {args.eval_rows} eval rows, config {args.config}, {os.cpu_count()} CPUs")
        peak = bf16_matmul_peak()
        print(f"measured bf16 matmul peak: {peak / 1e12:.3f} TFLOP/s")
        results = {side: run_side(side, work, args) for side in SIDES if args.only in (None, side)}
        peak = max(peak, bf16_matmul_peak())  # again after training: the best of the two on a shared machine
        hash_ratio = gen_ratio = None
        if not args.skip_aux:
            hash_ratio, gen_ratio = auxiliary_measurements(args, results.get("ours"))
    if args.only:
        for side, result in results.items():
            metrics = side_metrics(result, peak)
            print(json.dumps({"side": side, **{k: round(v, 4) for k, v in metrics.items()},
                              "peak_rss_mb": round(result["peak_rss_mb"], 1),
                              "final_loss": round(result["final_loss"], 4),
                              "train_seconds": round(result["train_seconds"], 1),
                              "wall_seconds": round(result["wall_seconds"], 1), "overrides": args.set}))
        return 0
    print(f"\nbf16 matmul peak {peak / 1e12:.3f} TFLOP/s; {rows} samples per side; "
          f"total bench time {(time.perf_counter() - started) / 60:.1f} min")
    print(format_table(results["ours"], results["trl"], peak))
    summary = summarize(results["ours"], results["trl"], peak, hash_ratio, gen_ratio)
    for name, ok in target_checks(summary).items():
        print(f"  [{'met' if ok else 'not measured' if ok is None else 'MISSED'}] {name}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
