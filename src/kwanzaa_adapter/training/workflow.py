"""`train_adapter()`: the eight steps of the training workflow (SPEC section 3), in order.

Each step is one named function that returns what the next one takes. Everything that can be
checked without a model (configuration, data files, the model reference, the metric backends,
the output directory) is checked in step 1, before anything is written.

Launched as several processes (`torchrun`, `accelerate launch`), every process trains and checks
its own base weights; only the main one writes the run directory, the artifact and the metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import enable_full_determinism, set_seed

from kwanzaa_adapter.config import KwanzaaConfig, load_training_config
from kwanzaa_adapter.data.tokenization import tokenize_file
from kwanzaa_adapter.data.validation import load_examples
from kwanzaa_adapter.evaluation.behavior import BehaviorReport, measure_behavior
from kwanzaa_adapter.evaluation.runs import PREDICTIONS_FILE
from kwanzaa_adapter.modeling import loading, sources
from kwanzaa_adapter.modeling.precision import PrecisionDecision
from kwanzaa_adapter.reporting.run_report import write_report
from kwanzaa_adapter.safety import signing
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.safety.checksums import (
    get_trainable_parameters_summary,
    load_base_model_checksums,
    report_dtype_changes,
    save_base_model_checksums,
    snapshot_dtypes,
    verify_base_weights_unchanged,
    verify_only_adapter_trainable,
)
from kwanzaa_adapter.tracking.monitoring import RunMonitor, check_backends
from kwanzaa_adapter.training.checkpointing import RunIdentity
from kwanzaa_adapter.training.distributed import Ranks, open_shared_run_directory, process_ranks
from kwanzaa_adapter.training.faults import fault_point
from kwanzaa_adapter.generation.evidence import EvidenceSelector
from kwanzaa_adapter.training.gate_fitting import GateFit, load_decision_data
from kwanzaa_adapter.training.preference import check_preference_data, run_preference
from kwanzaa_adapter.training.publishing import save_adapter_artifact
from kwanzaa_adapter.training.read_outs import fit_read_outs
from kwanzaa_adapter.training.rundir import RunDirectory, RunDirectoryError
from kwanzaa_adapter.training.trainer import TrainingOutcome, run_trainer

log = logging.getLogger(__name__)


class WeightsChangedError(Exception):
    """Base weights differ from the baseline: the run failed and nothing was published."""


class ArtifactInvalidError(Exception):
    """The freshly written artifact did not pass verification."""


@dataclass
class ModelBundle:
    model: object
    tokenizer: object
    source: sources.ModelSource
    device: str
    parameters: dict
    dtype_changes: list = field(default_factory=list)
    gradient_checkpointing: bool = False  # training.gradient_checkpointing, resolved on this device
    precision: PrecisionDecision | None = None  # model.precision, resolved on this device


@dataclass
class Datasets:
    train: list
    eval: list
    report: dict


@dataclass
class TrainResult:
    run_dir: Path
    artifact_dir: Path | None  # None on the processes that do not publish
    version: str
    summary: dict
    behavior: BehaviorReport | None = None
    gate: GateFit | None = None
    published: dict = field(default_factory=dict)  # MLflow run, artifact URI, registered version
    report: Path | None = None  # report.html in the run directory


def train_adapter(config_path: str | Path, overrides: tuple[str, ...] = (), output_dir: str | None = None,
                  resume: bool = False, callbacks: tuple = (), estimate: dict | None = None) -> TrainResult:
    """Train, verify and publish an adapter, then write its run report. `callbacks` are extra transformers
    TrainerCallbacks; `estimate` is the dry run's seconds by phase, recorded beside the measured ones."""
    started = time.time()
    config = load_configuration(config_path, overrides, output_dir)  # 1
    device = loading.resolve_device(config.training.device)
    ranks = process_ranks(device)
    # Never over a published artifact; the main process takes the lock and tells the others where it is.
    run = open_shared_run_directory(config, resume, ranks)
    with run, RunMonitor(config, run, active=ranks.is_main) as monitor:
        bundle = initialize_model(config, device)  # 2
        baseline = save_baseline(bundle, run, resume, ranks)  # 3
        datasets = load_datasets(config, bundle, ranks)  # 4
        outcome = training_loop(config, bundle, datasets, run, baseline, resume, callbacks, monitor)  # 5
        gate, selector = fit_decision_read_outs(config, bundle, ranks)  # 5, last: the decision and the evidence
        behavior = evaluate_behavior(config, bundle, run, ranks, monitor, outcome, gate, selector)  # 5b, and step 6
        verify_weights(bundle, run, ranks)  # 6, on every process
        if not ranks.is_main:
            return TrainResult(run.path, None, run.version, outcome.summary)
        artifact = create_artifact(config, bundle, datasets, outcome, run, baseline, started, behavior, gate,
                                   selector, estimate)  # 7
        validate_artifact(artifact, config.artifacts.signing)  # 8
        published = monitor.publish(artifact)  # MLflow run and model registry, once the artifact is valid
        report = write_run_report(run.path)
    return TrainResult(run.path, artifact, run.version, outcome.summary, behavior, gate, published, report)


def load_configuration(config_path, overrides, output_dir) -> KwanzaaConfig:
    """Step 1: compose and validate the config, then check data files and the model reference."""
    extra = (f"run.output_dir={output_dir}",) if output_dir else ()
    config = load_training_config(config_path, (*overrides, *extra))
    for path in (config.data.train_file, config.data.eval_file):
        load_examples(path, config.data.system_prompt)  # raises DataError listing every bad line
    sources.resolve_model_reference(config.model.name_or_path, config.model.revision)
    check_backends(config)  # a missing MLflow / W&B package or login fails here, not mid-run
    if config.training.preference.enabled:  # the mining and near-miss files, read as the stage will
        check_preference_data(config)
    if config.gate.fit or config.evidence.fit:  # the decision examples, eval prompts left out, as step 5 reads them
        load_decision_data(config)
    if config.artifacts.signing:  # an unreadable or wrong key fails here, not after training
        signing.private_key_fingerprint(config.artifacts.signing)
    return config


def initialize_model(config: KwanzaaConfig, device: str) -> ModelBundle:
    """Step 2: precision (measured on the CPU), base model (4-bit where configured), LoRA, the freeze check."""
    precision = loading.run_precision(config, device)
    # Seeded before LoRA's random initialisation, not only when the Trainer starts.
    (enable_full_determinism if config.run.deterministic else set_seed)(config.run.seed)
    model, tokenizer, source = loading.load_base_model(config, device, precision.resolved)
    checkpointing = loading.gradient_checkpointing_for(model, config)
    if config.training.gradient_checkpointing == "auto":
        log.info("gradient checkpointing (auto): %s on %s", "on" if checkpointing else "off", device)
    before = snapshot_dtypes(model)
    model = loading.add_adapter(model, config, checkpointing)
    verify_only_adapter_trainable(model)
    parameters = get_trainable_parameters_summary(model)
    changes = report_dtype_changes(before, model)
    log.info("trainable %s of %s parameters (%.3f%%)", parameters["trainable"], parameters["total"],
             parameters["percent"])
    for change in changes:
        log.info("k-bit preparation changed dtype: %s", change)
    return ModelBundle(model, tokenizer, source, device, parameters, changes, checkpointing, precision)


def save_baseline(bundle: ModelBundle, run: RunDirectory, resume: bool, ranks: Ranks = Ranks()) -> dict:
    """Step 3: SHA-256 of every base tensor, packed 4-bit data and quantization state included.

    A resumed run keeps the baseline it started with and refuses a base model that differs from it.
    With several processes the main one writes the baseline and every other checks its own base
    against it, so that all of them train the same weights.
    """
    if ranks.is_main:
        baseline = _main_baseline(bundle, run, resume)
    ranks.barrier()
    if ranks.is_main:
        return baseline
    diff = verify_base_weights_unchanged(bundle.model, run.baseline_path)
    if not diff.ok:
        raise WeightsChangedError(f"rank {ranks.rank}: base model differs from the main process's:\n{diff.format()}")
    return load_base_model_checksums(run.baseline_path)


def _main_baseline(bundle: ModelBundle, run: RunDirectory, resume: bool) -> dict:
    if resume and run.baseline_path.exists():
        diff = verify_base_weights_unchanged(bundle.model, run.baseline_path)
        if not diff.ok:
            raise RunDirectoryError(f"{run.path}: cannot resume: the base model differs from the one this run "
                                    f"started with:\n{diff.format()}")
        return load_base_model_checksums(run.baseline_path)
    return save_base_model_checksums(bundle.model, run.baseline_path)


def load_datasets(config: KwanzaaConfig, bundle: ModelBundle, ranks: Ranks = Ranks()) -> Datasets:
    """Step 4: render, tokenize (labels on assistant tokens), report truncation.

    The padding share is measured in step 5, on the batches the Trainer actually draws.
    """
    splits, reports = {}, {}
    for split, path in (("train", config.data.train_file), ("eval", config.data.eval_file)):
        with ranks.main_first():  # the main process fills the tokenization cache, the others read it
            examples, report = tokenize_file(path, bundle.tokenizer, config.data.max_seq_length,
                                             system_prompt=config.data.system_prompt,
                                             cache_dir=sources.cache_root() / "tokenized")
        splits[split] = [example.as_features() for example in examples]
        reports[split] = {"file": str(path), **dataclasses.asdict(report)}
        log.info("%s data: %s", split, reports[split])
    return Datasets(splits["train"], splits["eval"], reports)


def training_loop(config, bundle: ModelBundle, datasets: Datasets, run: RunDirectory, baseline: dict,
                  resume: bool, callbacks: tuple, monitor: RunMonitor) -> TrainingOutcome:
    """Step 5: the transformers Trainer, reporting to the enabled backends.

    Checkpoints carry the run's identity (config, data and base-model digests); a resumed run
    continues from the newest complete checkpoint only if that identity is its own.
    """
    identity = RunIdentity.of_run(config, baseline)
    outcome = run_trainer(config, bundle, datasets, run, identity, resume=resume, callbacks=callbacks,
                          reporters=tuple(monitor.callbacks()))
    if config.training.preference.enabled:  # 5, second stage: DPO on the adapter's own errors
        stage = run_preference(config, bundle, run, identity, resume=resume, callbacks=callbacks,
                               reporters=tuple(monitor.callbacks()), is_main=monitor.active)
        if outcome.summary:  # the main process's
            outcome.summary["preference"] = stage
            run.summary_path.write_text(json.dumps(outcome.summary, indent=2, sort_keys=True) + "\n")
    return outcome


def fit_decision_read_outs(config: KwanzaaConfig, bundle: ModelBundle,
                           ranks: Ranks) -> tuple[GateFit | None, EvidenceSelector | None]:
    """Step 5, after supervised training: the answerability gate and the evidence selector, read-outs of the
    adapted model fitted on one pass over the decision examples (training-side only); main process only."""
    if not ranks.is_main:
        return None, None
    return fit_read_outs(bundle.model, bundle.tokenizer, config)


def evaluate_behavior(config: KwanzaaConfig, bundle: ModelBundle, run: RunDirectory, ranks: Ranks,
                      monitor: RunMonitor, outcome: TrainingOutcome, gate: GateFit | None = None,
                      selector: EvidenceSelector | None = None) -> BehaviorReport | None:
    """Step 5b: the contract metrics of base and adapter on the eval split (SPEC section 6), and of the
    adapter with its gate beside it; main process only."""
    if not config.evaluation.behavioral or not ranks.is_main:
        return None
    # The fast engine derives its model from the base as checked here against the baseline.
    base_digest = None
    if config.inference.engine != "reference":
        verify_weights(bundle, run)
        base_digest = load_base_model_checksums(run.baseline_path)["model_digest"]
    report = measure_behavior(config, bundle.model, bundle.tokenizer, gate=gate.gate if gate else None,
                              base_digest=base_digest, selector=selector)
    report.write(run.path / PREDICTIONS_FILE)
    monitor.record_behavior(report, outcome.summary.get("steps", 0))
    return report


def verify_weights(bundle: ModelBundle, run: RunDirectory, ranks: Ranks = Ranks()) -> None:
    """Step 6: every process recomputes its base checksums; any difference fails the run before publishing."""
    diff = verify_base_weights_unchanged(bundle.model, run.baseline_path)
    failures = [(rank, text) for rank, text in enumerate(ranks.gather(None if diff.ok else diff.format())) if text]
    if failures:
        where = (lambda rank: f" on rank {rank}") if ranks.world_size > 1 else (lambda rank: "")
        raise WeightsChangedError("\n".join(f"base weights changed during training{where(rank)}:\n{text}"
                                             for rank, text in failures))


def create_artifact(config, bundle, datasets, outcome, run, baseline, started, behavior, gate=None,
                    selector=None, estimate=None) -> Path:
    """Step 7: final_artifact/ written to a temporary directory, signed where configured, verified
    there, and renamed into place."""
    return save_adapter_artifact(config, bundle, datasets, outcome, run, baseline, started, behavior,
                                 check=lambda staging: validate_artifact(staging, config.artifacts.signing), gate=gate,
                                 selector=selector, estimate=estimate)


def write_run_report(run_path: Path) -> Path | None:
    """After publication: report.html in the run directory. The artifact is published already, so a report
    that cannot be written is a warning, with the command that writes it again, not a failed run."""
    try:
        return write_report(run_path)
    except Exception as exc:  # noqa: BLE001 - nothing of the run may be lost over its report
        log.warning("the run report was not written (%s: %s); write it with: kwanzaa-adapter report %s",
                    type(exc).__name__, exc, run_path)
        return None


def validate_artifact(artifact: Path, signing_key: Path | None = None) -> None:
    """Step 8: completeness and integrity, exactly as `kwanzaa-adapter verify` checks them, and the
    signature against the public half of the run's signing key (`artifacts.signing`), derived from the
    private key each time: no public key is written where the artifact's writer could replace it.

    Run on the staging directory before publication (so a failure or a crash here publishes
    nothing) and again on the published copy.
    """
    fault_point("artifact_verify")
    report = verify_artifact(artifact)
    if not report.ok:
        raise ArtifactInvalidError(f"{artifact}: artifact failed verification:\n{report.format()}")
    if signing_key is not None:
        with signing.public_half(signing_key) as public_key:
            signed = signing.verify_signature(artifact, [public_key])
        if not signed.ok:
            raise ArtifactInvalidError(f"{artifact}: artifact failed verification:\n{signed.format()}")
