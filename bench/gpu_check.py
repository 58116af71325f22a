"""The CUDA path, proven: one prepared check of training, verification, generation and memory on a GPU.

    bash bench/pack_gpu_wheels.sh              # here: the wheels the GPU machine lacks, and SmolLM2's tokenizer
    bash bench/gpu_check.sh                    # there: installs them, runs the check below, JSON to $OUT
    python bench/gpu_check.py --device cuda    # the check itself, within --budget-s (480 s by default)
    python bench/gpu_check.py --device cpu     # every stage on tiny shapes, in seconds (tests/test_gpu_check.py)

Weights are random, shapes real: nothing is downloaded and the hub is never asked. The 135M model has
SmolLM2-135M's shape (configs/models/smollm2.yaml) and tokenizer; the 7B one OLMo-7B's (configs/models/ai2.yaml)
with SmolLM2's tokenizer, whose ids fit its embedding. On the CPU both are 2 layers of width 64.

Stages, each recorded as ok or with its error; one failing does not stop the others:
  setup       the 135M-shaped model saved, its run config over the first rows of the shipped data;
  workflow    train_adapter() on it with the GPU settings of configs/training.yaml (4-bit NF4 + double quant,
              model.precision, paged 8-bit AdamW, gradient checkpointing), 30 optimizer steps (3 on the CPU,
              where the trainer substitutes adamw_torch for the paged optimizer): real tokens/s, peak memory,
              the base digest before training and after;
  verify      `kwanzaa-adapter verify`'s check of the published artifact;
  generation  the artifact loaded through the model factory (verified first, base digest compared), then
              batched greedy decoding of a fixed number of tokens per prompt: tokens/s, peak memory;
  memory_7b   the 7B shape loaded in 4 bits and wrapped in LoRA (workflow step 2), a few optimizer steps
              (step 5) on rows of each sequence length: peak memory beside the dry-run plan's estimate;
  trl         the TRL SFTTrainer recipe of bench/throughput.py on the same model, data and schedule as
              workflow: real tokens/s of both, counted by throughput.py's counter.
Peak memory is torch.cuda.max_memory_allocated on CUDA and the process's peak RSS (VmHWM) on the CPU, reset
before each measure. A stage that passes its share of --budget-s is stopped and recorded; later ones run.
The last line printed is one JSON object, also written to --json-out after every stage.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))  # gpu_shapes.py, and throughput.py: its TRL recipe and its token counter
from gpu_shapes import (OLMO_7B, SMOLLM2_135M, load_tokenizer, peak_bytes, release, reset_peak,  # noqa: E402
                        rows_of_length, save_random_model, shape_config, write_run_config)

ROOT = BENCH.parent
PROMPTS_FILE = ROOT / "data" / "kwanzaa_eval_records.jsonl"
TRL_DATA_STACK = ("trl", "datasets", "pyarrow", "pandas")
MIN_STAGE_S = 5.0
# Seconds each stage may take at most, within --budget-s (the 7B shape's 14 GB are written and read back).
STAGE_CAPS = {"setup": 60, "workflow": 150, "verify": 20, "generation": 60, "memory_7b": 200, "trl": 100}


@dataclass(frozen=True)
class Profile:
    """What one device runs: shapes, lengths and step counts."""

    device: str
    tiny: bool
    steps: int  # optimizer steps of workflow and trl
    accumulation: int
    max_seq_length: int
    eval_rows: int
    memory_lengths: tuple[int, ...]
    memory_steps: int
    prompts: int
    new_tokens: int


PROFILES = {
    "cuda": Profile("cuda", False, steps=30, accumulation=4, max_seq_length=2048, eval_rows=16,
                    memory_lengths=(512, 2048), memory_steps=3, prompts=16, new_tokens=64),
    "cpu": Profile("cpu", True, steps=3, accumulation=1, max_seq_length=640, eval_rows=2,
                   memory_lengths=(256, 640), memory_steps=2, prompts=4, new_tokens=8),
}


class BudgetExceeded(Exception):
    """A stage ran past its share of --budget-s."""


@dataclass
class Check:
    """One run of the check: its profile, work directory, and what the stages hand each other."""

    profile: Profile
    work: Path
    deadline: float  # time.monotonic() by which every stage is over
    tokenizer_dir: Path | None
    json_out: Path | None
    report: dict
    tokenizer: object = None  # SmolLM2's, shared by both shapes
    counter: object = None  # throughput._Counter: every Trainer's micro-batches, counted alike
    config_path: Path | None = None  # the workflow's run config (the 135M shape)
    artifact: Path | None = None
    rates: dict = field(default_factory=dict)  # side -> real tokens/s of its training loop

    @property
    def device(self) -> str:
        return self.profile.device

    def needs(self, value, stage: str):
        if value is None:
            raise RuntimeError(f"needs the {stage} stage, which did not complete")
        return value


@dataclass
class Trained:
    """One Trainer's run as throughput.py's probe and counter saw it."""

    result: object
    probe: object  # the trained model, its steps and the training loop's time
    tokens: int  # real (non-padding) tokens trained on
    seconds: float  # the training loop, its evaluation passes excluded
    peak: int

    def figures(self) -> dict:
        return {"steps": self.probe.steps, "real_tokens": self.tokens,
                "real_tokens_per_s": round(self.tokens / self.seconds, 1), "peak_memory_bytes": self.peak}


def timed_training(check: Check, train: Callable[[object], object]) -> Trained:
    """`train(probe)`, with the probe on its Trainer's callbacks and every micro-batch counted."""
    import throughput

    counter = check.needs(check.counter, "setup")
    probe, before = throughput._probe_callback(), counter.real
    probe.counter = counter
    reset_peak(check.device)
    result = train(probe)
    return Trained(result, probe, counter.real - before, probe.loop_seconds - probe.eval_seconds_in_loop,
                   peak_bytes(check.device))


def versions() -> dict:
    found = {"python": sys.version.split()[0], "cuda": torch.version.cuda}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "trl", "pydantic"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def stage_setup(check: Check) -> dict:
    """The 135M-shaped model and its run config over the first rows of the shipped data; the token counter."""
    import throughput

    p = check.profile
    tokenizer = check.tokenizer = load_tokenizer(check.tokenizer_dir)
    config = shape_config(SMOLLM2_135M, p.tiny, len(tokenizer))
    model_dir = save_random_model(config, tokenizer, check.work / "smollm2-135m-shape", check.device)
    rows = p.steps * p.accumulation  # one epoch in per-device batches of 1: p.steps optimizer steps
    train, evaluation, _ = throughput.write_subsets(check.work, rows, p.eval_rows)
    check.config_path = write_run_config(
        check.work, "gpu-check", "smollm2.yaml", model_dir,
        data={"train_file": str(train), "eval_file": str(evaluation), "max_seq_length": p.max_seq_length},
        training={"num_epochs": 1, "gradient_accumulation_steps": p.accumulation, "logging_steps": 1,
                  "device": p.device},
        evaluation={"eval_steps": p.steps, "behavioral": False},
        checkpointing={"save_steps": p.steps})
    check.counter = throughput._Counter()
    check.counter.install()
    return {"train_rows": rows, "eval_rows": p.eval_rows, "tokenizer_ids": len(tokenizer)}


def stage_workflow(check: Check) -> dict:
    from kwanzaa_adapter.safety.checksums import compute_model_state_checksum, load_base_model_checksums
    from kwanzaa_adapter.training.workflow import train_adapter

    config_path = check.needs(check.config_path, "setup")
    run = timed_training(check, lambda probe: train_adapter(config_path, callbacks=(probe,)))
    check.artifact, check.rates["ours"] = run.result.artifact_dir, run.tokens / run.seconds
    before = load_base_model_checksums(run.result.run_dir / "baseline_checksums.json")["model_digest"]
    after = compute_model_state_checksum(run.probe.model)["model_digest"]  # recomputed here, after step 6's own
    metadata = json.loads((check.artifact / "metadata.json").read_text())
    return {**run.figures(), "optimizer": metadata["optimizer"], "precision": metadata["precision"]["resolved"],
            "final_eval_loss": run.result.summary.get("final_eval_loss"),
            "base_digest_before": before, "base_digest_after": after, "checksums_equal": before == after}


def stage_verify(check: Check) -> dict:
    from kwanzaa_adapter.safety.artifacts import verify_artifact

    report = verify_artifact(check.needs(check.artifact, "workflow"))
    if not report.ok:
        raise RuntimeError(report.format())
    return {"artifact_files": sorted(p.name for p in check.artifact.iterdir())}


def stage_generation(check: Check) -> dict:
    from kwanzaa_adapter.backend.models.factory import model_from_config
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.evaluation.eval_set import load_eval_items

    p = check.profile
    config = load_training_config(check.needs(check.config_path, "setup"))
    loaded = model_from_config(config, adapter=check.needs(check.artifact, "workflow"), device=check.device)
    prompts = [item.prompt for item in load_eval_items(PROMPTS_FILE, max_examples=p.prompts)]
    decode(loaded.model, loaded.tokenizer, prompts[:2], 2)  # warm-up
    reset_peak(check.device)
    tokens, seconds = decode(loaded.model, loaded.tokenizer, prompts, p.new_tokens)
    return {"prompts": len(prompts), "new_tokens_each": p.new_tokens, "batched_tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 1), "peak_memory_bytes": peak_bytes(check.device),
            "base_digest_matches_artifact": loaded.adapter.base_digest_matches}


def decode(model, tokenizer, prompts: list[list[dict]], new_tokens: int) -> tuple[int, float]:
    """(new tokens, seconds) of one greedy batch decoding exactly `new_tokens` per prompt: random weights
    would end a sequence anywhere, and evaluation.generate stops at a first token that is not '{'."""
    ids = [list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
           for prompt in prompts]
    tokenizer.padding_side = "left"  # decoding continues from the last position
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt").to(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        sync()
        started = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        sync()
    return (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0], time.perf_counter() - started


def stage_memory_7b(check: Check) -> dict:
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.modeling.planning import architecture_from_hf_config
    from kwanzaa_adapter.training.workflow import initialize_model, load_datasets

    p = check.profile
    check.needs(check.config_path, "setup")  # and its slices of the shipped data
    tokenizer = check.tokenizer
    shape = shape_config(OLMO_7B, p.tiny, len(tokenizer))
    model_dir = save_random_model(shape, tokenizer, check.work / "olmo-7b-shape", check.device)
    path = write_run_config(
        check.work, "gpu-check-7b", "ai2.yaml", model_dir, model={"family": "causal_lm"},
        data={"train_file": str(check.work / "train.jsonl"), "eval_file": str(check.work / "eval.jsonl"),
              "max_seq_length": p.max_seq_length},
        training={"max_steps": p.memory_steps, "gradient_accumulation_steps": 1, "logging_steps": 1,
                  "device": p.device},
        evaluation={"eval_steps": 1000, "behavioral": False, "early_stopping_patience": None},
        checkpointing={"save_steps": 1000})
    config = load_training_config(path)
    bundle = initialize_model(config, check.device)  # workflow step 2: 4-bit, LoRA, frozen base
    train = load_datasets(config, bundle).train  # step 4, whole conversations: rows are cut from them
    arch = architecture_from_hf_config(shape)
    lengths = {str(n): measure_steps(check, load_training_config(path, (f"data.max_seq_length={n}",)), bundle,
                                     arch, rows_of_length(train, n, p.memory_steps)) for n in p.memory_lengths}
    return {"parameters": bundle.parameters["total"], "trainable": bundle.parameters["trainable"],
            "gradient_checkpointing": bundle.gradient_checkpointing, "precision": bundle.precision.resolved,
            "memory_source": "torch.cuda.max_memory_allocated" if check.device == "cuda" else "VmHWM (peak RSS)",
            "lengths": lengths}


def measure_steps(check: Check, config, bundle, arch, rows: list[dict]) -> dict:
    """The project's Trainer for a few optimizer steps on `rows` (of data.max_seq_length tokens each):
    peak memory measured, and planned by the dry run's estimate for the same config."""
    from kwanzaa_adapter.modeling.planning import estimate_memory
    from kwanzaa_adapter.training.checkpointing import RunIdentity
    from kwanzaa_adapter.training.rundir import RunDirectory
    from kwanzaa_adapter.training.trainer import run_trainer
    from kwanzaa_adapter.training.workflow import Datasets

    length = config.data.max_seq_length
    run = RunDirectory(check.work / f"memory-{length}", "0.0.0")
    run.path.mkdir()
    release(check.device)  # the previous length's trainer and optimizer
    reset_peak(check.device)
    outcome = run_trainer(config, bundle, Datasets(rows, rows[:1], {}), run,
                          RunIdentity(config.digest(), {}, "random weights"))
    measured = peak_bytes(check.device)
    plan = estimate_memory(config, arch, check.device, bundle.gradient_checkpointing, bundle.precision.resolved)
    # max_memory_allocated never sees the CUDA context, nor bitsandbytes' paged optimizer state.
    allocated = plan.total - sum(v for k, v in plan.components.items() if k.startswith("CUDA context"))
    supervised = sum(label != -100 for row in rows for label in row["labels"]) / (length * len(rows))
    return {"steps": outcome.summary.get("steps"), "optimizer": outcome.optimizer, "tokens_per_row": length,
            "supervised_share": round(supervised, 3), "measured_peak_bytes": measured,
            "planned_bytes": round(plan.total), "planned_allocated_bytes": round(allocated),
            "measured_over_planned_allocated": round(measured / allocated, 3),
            "planned_components": {k: round(v) for k, v in plan.components.items()}}


def stage_trl(check: Check) -> dict:
    missing = [name for name in TRL_DATA_STACK if importlib.util.find_spec(name) is None]
    if missing:
        raise RuntimeError(f"not installed here: {', '.join(missing)} (TRL's data stack; bench/pack_gpu_wheels.sh "
                           "leaves datasets, pyarrow and pandas out: with bitsandbytes they exceed the 64 MiB carry)")
    import throughput

    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.modeling import loading as modeling

    config_path = check.needs(check.config_path, "setup")
    precision = modeling.run_precision(load_training_config(config_path), check.device).resolved
    run = timed_training(check, lambda probe: throughput.train_trl(
        check.work, config_path, [f"model.precision={precision}"], probe, device=check.device))
    result = {**run.figures(), "precision": precision, **run.result}
    if "ours" in check.rates:
        ours = check.rates["ours"]
        result.update(ours_real_tokens_per_s=round(ours, 1), ours_over_trl=round(ours * run.seconds / run.tokens, 3))
    return result


STAGES: tuple[tuple[str, Callable[[Check], dict]], ...] = (
    ("setup", stage_setup), ("workflow", stage_workflow), ("verify", stage_verify),
    ("generation", stage_generation), ("memory_7b", stage_memory_7b), ("trl", stage_trl),
)


@contextlib.contextmanager
def time_limit(seconds: float, stage: str) -> Iterator[None]:
    """Raise BudgetExceeded in the stage once `seconds` have passed (at its next Python bytecode)."""
    def expire(signum, frame):
        raise BudgetExceeded(f"stage {stage} stopped after its {seconds:.0f} s share of --budget-s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_stage(check: Check, name: str, stage: Callable[[Check], dict]) -> dict:
    """Run one stage within its share of the budget; record its figures, or its error, in the report."""
    started = time.monotonic()
    share = min(STAGE_CAPS[name], check.deadline - started)
    if share < MIN_STAGE_S:
        result = {"ok": False, "error": f"skipped: {max(share, 0):.0f} s of --budget-s left"}
    else:
        try:
            with time_limit(share, name):
                result = {"ok": True, **stage(check)}
        except Exception as exc:  # any failure is a finding: record it and go on to the next stage
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        finally:
            release(check.device)
    result["seconds"] = round(time.monotonic() - started, 2)
    check.report["stages"][name] = result
    check.report["ok"] = all(s["ok"] for s in check.report["stages"].values())
    if check.json_out is not None:
        staging = check.json_out.with_name(f".{check.json_out.name}.tmp")
        staging.write_text(json.dumps(check.report, indent=2) + "\n")
        staging.replace(check.json_out)
    return result


def header(profile: Profile, budget_s: float) -> dict:
    from kwanzaa_adapter.modeling.precision import machine_identity

    identity = machine_identity("cuda" if profile.device == "cuda" and torch.cuda.is_available() else "cpu")
    return {"check": "bench/gpu_check.py", "device": profile.device,
            "hardware": identity.get("gpu") or identity["cpu"],
            "weights": "random, tiny shapes (2 layers, width 64)" if profile.tiny else "random, real shapes",
            "shapes": {"small": "SmolLM2-135M", "large": "OLMo-7B"}, "versions": versions(),
            "budget_s": budget_s, "ok": False, "stages": {}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(PROFILES), default="cuda")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds for all stages together (default 480: one 10-minute run with set-up)")
    parser.add_argument("--tokenizer", type=Path, help="SmolLM2 tokenizer directory (default: the packaged GGUF's)")
    parser.add_argument("--json-out", type=Path, help="also write the JSON here, after every stage")
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR",
                        help="save SmolLM2's tokenizer (from the packaged GGUF) to DIR and exit")
    args = parser.parse_args(argv)
    # Every model and tokenizer here is local: the hub is never asked (read when transformers is imported).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.export_tokenizer is not None:
        load_tokenizer(None).save_pretrained(args.export_tokenizer)
        return 0
    started = time.monotonic()
    profile = PROFILES[args.device]
    with tempfile.TemporaryDirectory(prefix="kwanzaa-gpu-check-") as tmp:
        check = Check(profile, Path(tmp), started + args.budget_s, args.tokenizer, args.json_out,
                      header(profile, args.budget_s))
        for name, stage in STAGES:
            result = run_stage(check, name, stage)
            print(f"== {name}: {'ok' if result['ok'] else 'FAILED ' + result['error']} ({result['seconds']} s)",
                  flush=True)
    check.report["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(check.report))
    return 0 if check.report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
