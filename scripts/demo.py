"""`make demo`: train the CPU demo adapter end to end, verify it, and print its summary and wall time.

Before training it prints the dry run's plan: the precision this machine resolves, the memory
estimate and the estimated wall time; at the end the measured time beside that estimate, every variant
on the eval-only sets (held-out topics, paraphrased questions), and the path of the run report.
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from kwanzaa_adapter.cli import configure_logging
from kwanzaa_adapter.cli import main as cli
from kwanzaa_adapter.contract import Answer


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cli(command: list[str]) -> tuple[int, str]:
    """Run a CLI command, echo and return its standard output."""
    print(f"\n$ kwanzaa-adapter {' '.join(command)}", flush=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli(command)
    print(buffer.getvalue(), end="", flush=True)
    return code, buffer.getvalue()


def contract_answer(output: str) -> Answer:
    """The one answer `generate` printed, checked against the kwanzaa.answer.v1 contract."""
    lines = [line for line in output.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"expected one JSON line from generate, got {len(lines)}")
    line = json.loads(lines[0])
    if line.get("answer") is None:
        raise ValueError(f"generate answered outside the contract: {line.get('error')}")
    return Answer.model_validate(line["answer"])


def backend_check(config: str, artifact: Path) -> int:
    """The backend path on the new artifact: answer one held-out record in the contract; refuse a tampered copy."""
    records = Path("data/kwanzaa_eval_records.jsonl").read_text(encoding="utf-8").splitlines()
    held_out = next(line for line in records if not json.loads(line)["expect_refusal"])
    with tempfile.TemporaryDirectory() as tmp:
        record = Path(tmp) / "record.jsonl"
        record.write_text(held_out + "\n", encoding="utf-8")
        # Without the grammar: the answer must parse because the adapter learned the contract, not because
        # decoding forced it (the product default, constrained, makes even the untrained base parse).
        command = ["generate", "--config", config, "--adapter", str(artifact), "--input", str(record),
                   "--no-constrained", "--json"]
        code, output = run_cli(command)
        if code:
            return 1
        try:
            answer = contract_answer(output)
        except ValueError as exc:
            print(f"the backend's answer is not a contract answer: {exc}", file=sys.stderr)
            return 1
        print(f"contract answer: {answer.answer.completeness}, cites {sorted(answer.cited_numbers())}")
        tampered = Path(tmp) / "tampered"
        shutil.copytree(artifact, tampered)
        weights = tampered / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
        command[4] = str(tampered)
        print("   (one byte of the weights flipped)")
        code, _ = run_cli(command)
        print(f"exit code {code}")
        return 0 if code == 1 else 1


def gate_summary(metadata: dict) -> str:
    """The gate's choice, its calibration and its cost beside the supervised training it follows."""
    gate, timings = metadata["gate"], metadata["timings"]
    train = (timings.get("train_seconds") or 0.0) - (timings.get("eval_loss_seconds") or 0.0)
    share = f", {gate['seconds'] / train:.2f} x the supervised training ({train:.0f} s)" if train else ""
    return (f"\nanswerability gate: block {gate['layer']} at the prompt's end, threshold P(refuse) > "
            f"{gate['threshold']:.3f}, calibration AUC {gate['calibration_auc']:.3f} (cross-fitted on "
            f"{gate['examples']} decision examples, {gate['refusals']} refuse); fitted in {gate['seconds']:.0f} s{share}")


def evidence_summary(metadata: dict) -> str:
    """The evidence selector's reading and its calibration on the training side."""
    evidence = metadata["evidence"]
    second = evidence["second_threshold"]
    return (f"evidence selector: the question's attention in blocks 1-{evidence['blocks']} ({evidence['width']} "
            f"values a sentence), cross-fitted top-1 accuracy {evidence['calibration_top1']:.3f} on "
            f"{evidence['examples']} answerable decision examples; "
            + (f"a second sentence at P >= {second:.2f}" if second <= 1 else "one sentence an answer")
            + f"; fitted in the gate's pass ({evidence.get('seconds', 0):.0f} s with it)")


def run(config: str = "configs/demo.yaml") -> int:
    configure_logging()
    from kwanzaa_adapter.cli.dryrun import make_plan
    from kwanzaa_adapter.reporting.run_report import phase_seconds
    from kwanzaa_adapter.training.workflow import train_adapter

    print(f"$ kwanzaa-adapter train --config {config} --dry-run", flush=True)
    plan = make_plan(config)
    print(plan.text, flush=True)
    started = time.perf_counter()
    result = train_adapter(config, estimate=plan.eta.phases if plan.eta else None)
    wall = time.perf_counter() - started
    print(f"\nartifact v{result.version} published at {result.artifact_dir}")
    for step in (["verify", str(result.artifact_dir)], ["info", str(result.artifact_dir)]):
        code, _ = run_cli(step)
        if code:
            return code
    if backend_check(config, result.artifact_dir):
        print("the backend check failed", file=sys.stderr)
        return 1
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    if result.gate is not None:
        print(gate_summary(metadata))
    if metadata.get("evidence"):
        print(evidence_summary(metadata))
    if result.behavior is not None:
        lexical = result.behavior.baselines["lexical"]
        print("\nbehavioral metrics on the eval split: the baselines a user could pick instead (base: the base model "
              "under the contract's grammar; lexical: refuse below a question-word overlap of "
              f"{lexical['threshold']:.3f}, fitted on {lexical['train_examples']} train records, else the sentence "
              "sharing most words with the question), then the adapter"
              + (", with its answerability gate" if result.behavior.gated else "")
              + (" and as the product finishes its answers (evidence, grounding)" if result.behavior.finished else "")
              + ":")
        print(result.behavior.table())
        for run in result.behavior.runs:
            if run.engine != "lexical":
                print(f"generation ({run.label}, {run.engine}): {run.tokens_per_second:.1f} tokens/s")
        for label, choice in (result.behavior.engine or {}).items():
            if choice.get("fallback_reason"):
                print(f"the {label} run fell back to the reference path: {choice['fallback_reason']}")
    s = result.summary
    if plan.eta:
        print("\nwall time by phase, estimated before the run and measured:")
        for name, seconds in phase_seconds(metadata["timings"], wall).items():
            print(f"  {name:<28} {plan.eta.phases.get(name, 0.0):7.0f} s  {seconds:7.0f} s")
    estimated = f"{plan.eta.total / 60:.1f} min" if plan.eta else "no estimate"
    print(f"\ndemo main job wall time: {wall / 60:.1f} min ({wall:.0f} s; estimated {estimated}); "
          f"precision {plan.precision.resolved}; peak RSS {peak_rss_mib():.0f} MiB; "
          f"train tokens/s {s.get('mean_tokens_per_second') or 0:.0f}; final eval loss {s.get('final_eval_loss'):.4f}")
    if result.behavior is not None and measure_other_sets(config, result):
        return 1
    code, output = run_cli(["report", str(result.run_dir)])
    if code:
        return code
    print(f"\nopen the run report: {output.strip().removeprefix('run report: ')}")
    return 0


# The sets no training step reads: the held-out topics and the paraphrased questions (data/README.md).
OTHER_SETS = {"heldout": "data/kwanzaa_heldout.jsonl", "paraphrase": "data/kwanzaa_paraphrase.jsonl"}


def measure_other_sets(config: str, result) -> int:
    """Every variant on the eval-only sets, kept under the run (evals/NAME/) where the report finds them."""
    from kwanzaa_adapter.reporting.run_report import EVALS_DIRNAME

    for name, data in OTHER_SETS.items():
        output = result.run_dir / EVALS_DIRNAME / name / "metrics.json"
        code, _ = run_cli(["eval", "--config", config, "--adapter", str(result.artifact_dir), "--data", data,
                           "--output", str(output)])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(run(*sys.argv[1:]))
