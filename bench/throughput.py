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

This file runs the rounds and prints the results; the arithmetic and the table live in
throughput_report.py, and the child process that trains one side in throughput_sides.py.
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

# The siblings import by bare name whether this runs as a script or is loaded by path (tests, gpu_check.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
# Re-exported as well: tests and bench/gpu_check.py read these as throughput.<name>.
from throughput_report import (  # noqa: E402, F401
    LABELS,
    SUMMARY_KEYS,
    TARGETS,
    format_table,
    lora_parameter_count,
    median_run,
    sequence_lengths,
    side_metrics,
    summarize,
    target_checks,
    training_flops,
)
from throughput_sides import (  # noqa: E402, F401
    IGNORE_INDEX,
    _Counter,
    _probe_callback,
    assistant_token_loss,
    child,
    load_config,
    peak_rss_mb,
    train_ours,
    train_trl,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
TRAIN_FILE = ROOT / "data" / "kwanzaa_train.jsonl"
EVAL_FILE = ROOT / "data" / "kwanzaa_eval.jsonl"
SIDES = ("ours", "trl", "trl_tuned")


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
