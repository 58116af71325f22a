"""Step 7: the published artifact: adapter, metadata, resolved config, metrics, model card, manifest."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kwanzaa_adapter.evaluation.behavior import COMPARISON_PLOT
from kwanzaa_adapter.evaluation.runs import plot_comparison
from kwanzaa_adapter.generation.evidence import EVIDENCE_FILE
from kwanzaa_adapter.generation.gate import GATE_FILE
from kwanzaa_adapter.safety.artifacts import atomic_directory, seal_artifact, sha256_file
from kwanzaa_adapter.safety.checksums import verify_adapter_state_dict
from kwanzaa_adapter.safety.signing import SIGNATURE_NAME, private_key_fingerprint, sign_directory
from kwanzaa_adapter.tracking.monitoring import plot_training_curves
from kwanzaa_adapter.training.faults import fault_point

ARTIFACT_FORMAT = "kwanzaa-adapter.artifact.v1"
CURVES_FILE = "training_curves.png"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "pydantic")


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("kwanzaa-adapter", *LIBRARIES):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the kwanzaa_adapter package, above training/


def git_commit(package_dir: Path = PACKAGE_DIR) -> str | None:
    """The commit of the package's own source ("-dirty" when it has uncommitted changes), or None.

    Asked of the package's directory, not of the working directory: a run started from another
    repository must not record that one. A package installed from a wheel is in no repository; one
    whose files the enclosing repository does not track (a virtual environment inside a project)
    is not that repository's either.
    """
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=5,
                              check=True).stdout.strip()

    try:
        git("ls-files", "--error-unmatch", "__init__.py")  # tracked here, or CalledProcessError
        dirty = git("status", "--porcelain", "--", ".")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: str) -> dict:
    info = {"device": device, "platform": platform.platform(), "processor": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def dataset_record(path: str, report: dict) -> dict:
    return {"file": str(path), "sha256": sha256_file(path, follow_symlinks=True)[0], **report}


def create_artifact_metadata(config, bundle, datasets, outcome, run, baseline, started, behavioral=None,
                             gate=None) -> dict:
    return {
        "format": ARTIFACT_FORMAT,
        "artifact_version": run.version,
        "run_name": config.run.name,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "base_model": {**bundle.source.identity, "model_digest": baseline["model_digest"],
                       "family": config.model.family, "trust_remote_code": config.model.trust_remote_code,
                       "quantization": config.quantization.model_dump(mode="json")},
        "adapter": config.adapter.model_dump(mode="json"),
        "datasets": {split: dataset_record(report["file"], report) for split, report in datasets.report.items()},
        "config_sha256": config.digest(),
        "seed": config.run.seed,
        "versions": library_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(bundle.device),
        "timings": {"total_seconds": round(time.time() - started, 1),
                    "train_seconds": outcome.train_metrics.get("train_runtime"),  # eval-loss passes included
                    "eval_loss_seconds": outcome.summary.get("eval_seconds"),
                    "behavioral_seconds": (behavioral or {}).get("seconds"),
                    "gate_seconds": round(gate.seconds, 1) if gate else None},
        "parameters": {**{k: bundle.parameters[k] for k in ("trainable", "total", "percent")},
                       "trainable_tensors": len(bundle.parameters["trainable_names"])},
        "optimizer": outcome.optimizer,
        "gradient_checkpointing": bundle.gradient_checkpointing,  # as resolved on this device
        "precision": bundle.precision.as_json(),  # model.precision as resolved, with the CPU probe
        "notes": outcome.notes,
        # training.preference: pairs mined (by error type), beta, steps and seconds of every round
        "preference": outcome.summary.get("preference"),
        "final_metrics": final_metrics(outcome, behavioral),
        # The answerability gate (GATE_FILE): block, position, threshold, calibration AUC, its examples
        "gate": {"file": GATE_FILE, **gate.summary()} if gate else None,
        "signing": {"signature": SIGNATURE_NAME, "public_key_sha256": private_key_fingerprint(config.artifacts.signing)}
        if config.artifacts.signing else None,
    }


def final_metrics(outcome, behavioral=None) -> dict:
    s = outcome.summary
    metrics = {
        "train_loss": s.get("final_loss"),
        "eval_loss": s.get("final_eval_loss"),
        "perplexity": s.get("final_perplexity"),
        "best_eval_loss": s.get("best_eval_loss"),
        "mean_tokens_per_second": s.get("mean_tokens_per_second"),
        "padding_share": s.get("padding_share"),  # of the micro-batches trained on
        "steps": s.get("steps"),
    }
    if behavioral:
        metrics["behavioral"] = behavioral
    return metrics


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def signed_usage(metadata: dict) -> str:
    """The verify flag and the lines of the model card for a signed artifact; nothing for an unsigned one.
    The card names no key file: a key or fingerprint read from the artifact or its run directory proves
    only that the artifact agrees with itself, so the user verifies with the publisher's key."""
    if not metadata.get("signing"):
        return ""
    return (" --public-key PUBLISHER.pub\n"
            f"# {SIGNATURE_NAME}: verify (and serve with --trusted-key) using the publisher's public key, obtained\n"
            "# out of band (from the publisher, not from this directory or its run directory); compare its\n"
            "# fingerprint with the one the publisher gave you, never with one printed here")


def preference_line(preference: dict | None) -> str:
    """The model card's account of training.preference: what each round mined and trained."""
    if not preference:
        return "off"
    rounds = []
    for r in preference["rounds"]:
        errors = ", ".join(f"{kind.replace('_', ' ')} {count}" for kind, count in r["errors"].items() if count)
        rounds.append(f"round {r['round']}: {r['pairs']} pairs ({errors or 'no errors'} of {r['examples']} mined; "
                      f"{r['near_miss']} near-miss), {r['steps']} steps")
    loss = f"DPO + {preference['sft_weight']} x NLL" if preference["sft_weight"] else "DPO"
    return f"{loss}, beta {preference['beta']}, lr {preference['learning_rate']}; " + "; ".join(rounds)


def gate_section(metadata: dict) -> str:
    """The model card's account of the answerability gate: what feeds it, where it cuts, how well it
    separated the decision examples it was chosen on."""
    gate = metadata.get("gate")
    if not gate:
        return "This artifact has no answerability gate: the generation makes its own answer-or-refuse decision."
    tried = ", ".join(f"block {c['layer']} C {c['C']}: {c['auc']:.3f}" for c in gate["candidates"])
    return f"""`{gate['file']}` decides answer or refuse before the answer is written: a logistic regression
over the output of decoder block {gate['layer']} at the prompt's last token (width {gate.get('width', 'n/a')}),
standardised; it refuses when P(refuse) > {gate['threshold']:.3f}. It forces only that decision (the
answer text opening "The documents do not" and `completeness: insufficient_data`, or neither); the
model writes the rest.

| | |
| --- | --- |
| calibration AUC (cross-fitted, {gate['folds']} folds grouped by question) | {gate['calibration_auc']:.3f} |
| decision examples | {gate['examples']} ({gate['refusals']} refuse) from `{gate['decision_file']}`, none sharing a prompt with an eval set |
| threshold | {gate['threshold']:.3f}, fewest errors weighted by a refusal share of {gate['refusal_prior']} |
| candidates (cross-fitted AUC) | {tried} |
| fitting time | {gate['seconds']:.0f} s |

Turn it off with `--set gate.apply=false` to compare with the generation's own decision."""


# The model card's behavioral table: the baselines a user could pick instead, then the adapter.
CARD_COLUMNS = {"base": "base (grammar)", "lexical": "lexical rules", "adapter": "adapter",
                "adapter_gate": "adapter + gate", "adapter_evidence": "adapter + evidence",
                "adapter_gate_evidence": "adapter + gate + evidence"}
CARD_METRICS = ("answer_correctness_rate", "gold_citation_precision", "exact_answer_rate", "json_validity_rate",
                "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate", "gold_citation_rate")


def generate_adapter_readme(config, metadata: dict, with_comparison: bool) -> str:
    base = config.model.name_or_path
    m = metadata["final_metrics"]
    tags = "\n".join(f"  - {t}" for t in config.artifacts.tags)
    behavioral = m.get("behavioral") or {}
    columns = [key for key in CARD_COLUMNS if key in behavioral]
    rows = ["| metric | " + " | ".join(CARD_COLUMNS[key] for key in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in CARD_METRICS:
        if columns and name in behavioral.get("adapter", {}):
            rows.append(f"| {name} | " + " | ".join(_fmt(behavioral[key].get(name)) for key in columns) + " |")
    if columns:
        rows.insert(0, "Behavior on the eval split: the baselines a user could pick instead (the base model under "
                       "the contract's grammar; the word-overlap rules), then the adapter.\n")
    rows += ["", f"Eval loss {_fmt(m['eval_loss'])}, perplexity {_fmt(m['perplexity'])}."]
    q = config.quantization
    precision = metadata["precision"]["resolved"]
    top = config.adapter.top_layers
    layers = f", the last {top} blocks only" if top else ""
    quant = f"4-bit {q.quant_type}, double quant {q.double_quant}, compute {precision}" if q.load_in_4bit else "none"
    t = config.training
    return f"""---
base_model: {base}
library_name: peft
license: {config.artifacts.license}
pipeline_tag: text-generation
tags:
{tags}
---

# {config.run.name} v{metadata['artifact_version']}

A LoRA adapter for `{base}` that answers questions from retrieved documents in the
`kwanzaa.answer.v1` JSON contract, citing documents as `[n]` and refusing when the documents do
not hold the answer. Trained with kwanzaa-adapter {metadata['versions']['kwanzaa-adapter']}.

## Usage

Verified load (checks every file against `checksums.json` first):

```bash
kwanzaa-adapter verify {config.run_dir / 'final_artifact'}{signed_usage(metadata)}
kwanzaa-adapter eval --config <config> --adapter {config.run_dir / 'final_artifact'}
```

Plain PEFT, after verification:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("<base model directory or hub id>")
model = PeftModel.from_pretrained(base, "final_artifact")
tokenizer = AutoTokenizer.from_pretrained("<base model directory or hub id>")
```

## Training setup

| setting | value |
| --- | --- |
| base model | `{base}` (digest `{metadata['base_model']['model_digest'][:16]}`) |
| quantization | {quant} |
| precision | {precision} ({metadata['precision']['setting']}: {metadata['precision']['reason']}) |
| adapter | LoRA r={config.adapter.r}, alpha={config.adapter.alpha}, dropout={config.adapter.dropout}, targets {', '.join(config.adapter.target_modules)}{layers} |
| trainable parameters | {metadata['parameters']['trainable']:,} of {metadata['parameters']['total']:,} |
| data | {', '.join(f"{k}: {v['rows']} rows" for k, v in metadata['datasets'].items())} |
| batch | {t.per_device_batch_size} x {t.gradient_accumulation_steps} accumulation, {config.data.batching}, max {config.data.max_seq_length} tokens |
| schedule | lr {t.learning_rate} {t.lr_scheduler}, warmup {t.warmup_ratio}, {t.num_epochs} epochs, {metadata['final_metrics']['steps']} steps |
| optimizer | {metadata['optimizer']}, clip {t.max_grad_norm} |
| preference stage | {preference_line(metadata.get('preference'))} |
| seed | {config.run.seed} |
| config digest | `{metadata['config_sha256'][:16]}` |

## Metrics

{chr(10).join(rows)}

{f"![The baselines and the adapter]({COMPARISON_PLOT})" if with_comparison else ""}

## Answerability gate

{gate_section(metadata)}

![Training curves]({CURVES_FILE})

## Provenance

Base weights were checksummed before and after training and are unchanged. Every file of this
artifact is listed with its SHA-256 in `checksums.json`; `metadata.json` records the library
versions, hardware, dataset digests and timings.

The [run report](../report.html) (`report.html`, in the run directory above this artifact) shows the
training curves, the proofs with their results, every variant's rates and the answers behind them. It is
not part of the sealed artifact: it shows this artifact's verification, so it is written after sealing, and
it reads the run's training log and predictions; `kwanzaa-adapter report RUN_DIR` writes it again.
"""


def save_adapter_artifact(config, bundle, datasets, outcome, run, baseline, started, behavior=None,
                          check=None, gate=None, selector=None, estimate=None) -> Path:
    """Write final_artifact/ atomically (temporary directory, then rename) and seal it.

    `check(staging)` runs on the sealed artifact before it is renamed into place: a run killed or
    failing during that verification publishes nothing.
    """
    model = bundle.model
    behavioral = behavior.as_json() if behavior else None
    if behavioral:
        behavioral["generation_tokens_per_second"] = behavior.generation_tokens_per_second()
        behavioral["seconds"] = round(behavior.seconds, 1)
    model.peft_config["default"].base_model_name_or_path = config.model.name_or_path
    model.save_pretrained(run.adapter_path, safe_serialization=True)
    metadata = create_artifact_metadata(config, bundle, datasets, outcome, run, baseline, started, behavioral, gate)
    if estimate:  # the dry run's seconds by phase, for the report's measured-beside-estimated table
        metadata["timings"]["estimate"] = {name: round(seconds, 1) for name, seconds in estimate.items()}
    if selector is not None:  # sealed and signed with the rest, like the gate
        metadata["evidence"] = {"file": EVIDENCE_FILE, **selector.describe()}
    with atomic_directory(run.artifact_path) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        fault_point("artifact_write")
        verify_adapter_state_dict(load_file(staging / "adapter_model.safetensors"))
        if gate is not None:
            gate.gate.save(staging / GATE_FILE)
        if selector is not None:
            selector.save(staging / EVIDENCE_FILE)
        plot_training_curves(outcome.history, staging / CURVES_FILE, title=f"{config.run.name} v{run.version}")
        shutil.copyfile(staging / CURVES_FILE, run.path / CURVES_FILE)  # the run directory shows it too
        if behavior:
            plot_comparison(behavior.columns(), staging / COMPARISON_PLOT)
        (staging / "metadata.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        (staging / "training_config.yaml").write_text(config.to_yaml())
        training_metrics = {"summary": outcome.summary, "final_eval": outcome.final_eval,
                            "train": outcome.train_metrics, "behavioral": behavioral}
        (staging / "training_metrics.json").write_text(json.dumps(training_metrics, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(generate_adapter_readme(config, metadata, bool(behavior)))
        seal_artifact(staging)
        if config.artifacts.signing:
            sign_directory(staging, config.artifacts.signing)  # over every file, checksums.json included
        if check is not None:
            check(staging)
    results = {"artifact": str(run.artifact_path), "metadata": metadata, "training_metrics": training_metrics,
               "trainable_parameter_names": bundle.parameters["trainable_names"],
               "dtype_changes": [str(change) for change in bundle.dtype_changes]}
    run.results_path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return run.artifact_path
