"""Step 5 of the workflow: the transformers `Trainer`, configured from the typed config.

No hand-written loop: accumulation, clipping, the schedule, evaluation, checkpoints, resume and
early stopping are the Trainer's. This module translates the config, records metrics, and makes
each checkpoint complete or absent (`KwanzaaTrainer._save_checkpoint`, see `checkpointing`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.data.collation import make_collator
from kwanzaa_adapter.data.supervised_logits import SupervisedLogitsCollator, supervised_loss
from kwanzaa_adapter.evaluation.metrics import MetricsTracker, compute_perplexity
from kwanzaa_adapter.training.checkpointing import (
    RunIdentity,
    checkpoint_to_resume,
    publish_checkpoint,
    rotate_checkpoints,
    staging_path,
)
from kwanzaa_adapter.training.faults import FaultInjection, fault_injection_enabled, fault_point
from kwanzaa_adapter.training.host_memory import can_release_free_heap, release_free_heap

log = logging.getLogger(__name__)

CUDA_ONLY_OPTIMIZERS = {"paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit"}


@dataclass
class TrainingOutcome:
    summary: dict
    history: list[dict]
    train_metrics: dict
    final_eval: dict
    optimizer: str
    notes: list[str] = field(default_factory=list)


def choose_optimizer(requested: str, device: str) -> tuple[str, str | None]:
    """The configured optimizer, or adamw_torch with a note where bitsandbytes' paged/8-bit ones cannot run."""
    if requested in CUDA_ONLY_OPTIMIZERS and device != "cuda":
        return "adamw_torch", f"optimizer {requested} needs CUDA; using adamw_torch on {device}"
    return requested, None


class MetricsRecorder(TrainerCallback):
    """Adds perplexity and tokens/s to every log line and appends it to metrics_history.jsonl."""

    def __init__(self, tracker: MetricsTracker | None):
        self.tracker = tracker
        self._last = None  # (time, tokens) at the previous training log line
        self._started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()
        self._last = (self._started, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "train_loss" in logs:  # the end-of-training summary, not a step
            return
        if "eval_loss" in logs:
            logs["eval_perplexity"] = compute_perplexity(logs["eval_loss"])
        entry = {
            "step": state.global_step,
            "epoch": logs.get("epoch"),
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "perplexity": logs.get("eval_perplexity"),
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "wall_time": time.perf_counter() - self._started,
        }
        if "loss" in logs:
            now, tokens = time.perf_counter(), state.num_input_tokens_seen
            elapsed = now - self._last[0]
            if elapsed > 0:
                logs["tokens_per_second"] = entry["tokens_per_second"] = (tokens - self._last[1]) / elapsed
            self._last = (now, tokens)
        if self.tracker is not None:  # the main process's
            self.tracker.log_metrics({k: v for k, v in entry.items() if v is not None})


class TokensPerSecondProgress(ProgressCallback):
    """The Trainer's progress bar with the training tokens per second beside it (since the run began)."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        super().on_step_end(args, state, control, **kwargs)
        elapsed = time.perf_counter() - self._start[0]
        if self.training_bar is not None and elapsed > 0:
            rate = (state.num_input_tokens_seen - self._start[1]) / elapsed
            self.training_bar.set_postfix_str(f"{rate:.0f} tokens/s", refresh=False)


class ReleaseHostMemory(TrainerCallback):
    """Returns the heap's free pages to the OS after every optimizer step and every evaluation batch
    (`training.release_host_memory`): without the second, the eval-loss pass that ends the demo's
    training grew its resident memory by 1.5 GiB over 70 rows, which generation then built on."""

    def on_step_end(self, args, state, control, **kwargs):
        release_free_heap()

    def on_prediction_step(self, args, state, control, **kwargs):
        release_free_heap()


def optimizer_moments_digest(state_dict: dict) -> dict:
    """What an optimizer state holds, digested: parameters with state, their step count, and the
    SHA-256 of every state tensor (Adam's moments) in parameter order. The same for a live optimizer's
    `state_dict()` and for a checkpoint's `optimizer.pt`, so the two can be compared."""
    digest, steps = hashlib.sha256(), set()
    for key in sorted(state_dict.get("state", {})):
        for name, value in sorted(state_dict["state"][key].items()):
            if not isinstance(value, torch.Tensor):
                continue
            if name == "step":
                steps.add(float(value))
                continue
            digest.update(f"{key}.{name}".encode())
            digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"parameters": len(state_dict.get("state", {})), "steps": sorted(steps), "sha256": digest.hexdigest()}


class ResumeRecorder(TrainerCallback):
    """Where a resumed run started, read from the Trainer's own state once it has loaded the checkpoint."""

    def __init__(self, record: dict):
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs):
        self.record["started_at_step"] = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.record["steps_run"] = state.global_step - self.record["started_at_step"]


class SealedCheckpoints:
    """Trainer checkpoints that are complete or absent and carry the run's identity (a mixin for
    `Trainer` and TRL's trainers, which inherit it).

    `Trainer._save_checkpoint` writes `checkpoint-N` in place and rotates by deleting in place, so
    a crash can leave a half-written or half-deleted checkpoint under a name that resume trusts.
    Here the same pieces (model, optimizer, scheduler, scaler, RNG states, trainer state) go to
    `.tmp-checkpoint-N`, which is sealed with a manifest and renamed; old ones are renamed away
    before they are deleted.
    """

    def __init__(self, *args, identity: RunIdentity, **kwargs):
        super().__init__(*args, **kwargs)
        self.identity = identity
        self.resume_record: dict = {}  # what resuming loaded, from the Trainer's own state

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.resume_record["checkpoint"] = Path(checkpoint).name
            self.resume_record["optimizer"] = optimizer_moments_digest(self.optimizer.state_dict())
            self.resume_record["scheduler"] = {"last_epoch": self.lr_scheduler.last_epoch,
                                               "learning_rate": self.lr_scheduler.get_last_lr()[0]}

    def _load_rng_state(self, checkpoint):
        super()._load_rng_state(checkpoint)
        if checkpoint is not None:
            state = torch.random.get_rng_state().numpy().tobytes()
            self.resume_record["rng"] = {"torch_cpu_sha256": hashlib.sha256(state).hexdigest()}

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self.args.output_dir)
        final = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = staging_path(final)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(str(staging), _internal_call=True)
        fault_point("checkpoint_write")
        if self.state.best_global_step:  # recorded under the name it has once published
            best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}"
            if best == final or best.is_dir():
                self.state.best_model_checkpoint = str(best)
        self._save_optimizer_and_scheduler(str(staging))
        self._save_scaler(str(staging))
        self._save_rng_state(str(staging))  # every process writes its own
        self.accelerator.wait_for_everyone()
        if not self.args.should_save:
            return
        for callback in [*self.callback_handler.callbacks, self.control]:
            if isinstance(callback, ExportableState):
                name = callback.__class__.__name__
                if isinstance(self.state.stateful_callbacks.get(name), list):
                    self.state.stateful_callbacks[name].append(callback.state())
                else:
                    self.state.stateful_callbacks[name] = callback.state()
        self.state.save_to_json(str(staging / "trainer_state.json"))
        publish_checkpoint(staging, final, self.identity)
        rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint)


class KwanzaaTrainer(SealedCheckpoints, Trainer):
    """The supervised stage's Trainer: sealed checkpoints, and the padding share of what it computed."""

    def __init__(self, *args, identity: RunIdentity, **kwargs):
        super().__init__(*args, identity=identity, **kwargs)
        self.computed_tokens = self.padding_tokens = 0  # over the micro-batches trained on

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.computed_tokens += inputs["input_ids"].numel()
        mask = inputs.get("attention_mask")
        if mask is not None:
            self.padding_tokens += int((mask == 0).sum())
        return super().training_step(model, inputs, num_items_in_batch)


def _final_evaluation(trainer: Trainer) -> dict:
    """Eval metrics at the final step: the scheduled evaluation's when it ran there, else a new one."""
    state = trainer.state
    last = next((h for h in reversed(state.log_history) if "eval_loss" in h), None)
    stale = last is None or last["step"] != state.global_step
    if trainer.args.load_best_model_at_end:  # the model now holds the best checkpoint's weights
        stale = stale or state.best_global_step != state.global_step
    if stale:
        last = trainer.evaluate()
    final = {k: v for k, v in last.items() if k.startswith("eval_")}
    final["eval_perplexity"] = compute_perplexity(final["eval_loss"])
    return final


def schedule_arguments(config: KwanzaaConfig) -> dict:
    """The batch and optimization settings any transformers-Trainer recipe takes from the config."""
    t = config.training
    return {
        "num_train_epochs": t.num_epochs,
        "per_device_train_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": t.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "seed": config.run.seed,
    }


def checkpointing_arguments(enabled: bool, arguments_class=None) -> dict:
    """Gradient checkpointing for TrainingArguments under the name this transformers knows: 5.24 calls it
    `activation_checkpointing` (the old name warns), 5.17 (the GPU machine's) only `gradient_checkpointing`."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(arguments_class or TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in names else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": {"use_reentrant": False} if enabled else None}


def runtime_arguments(config: KwanzaaConfig, device: str, precision: str) -> dict:
    """What both stages' arguments share: seeding and determinism, device and autocast, checkpoint
    cadence, and no reporting of their own (RunMonitor's callbacks report)."""
    c = config.checkpointing
    return dict(save_strategy="steps", save_steps=c.save_steps, save_total_limit=c.save_total_limit,
                data_seed=config.run.seed, full_determinism=config.run.deterministic, use_cpu=device == "cpu",
                bf16=precision == "bfloat16", fp16=precision == "float16", report_to="none",
                dataloader_num_workers=0, dataloader_pin_memory=device == "cuda", disable_tqdm=False)


def build_training_arguments(config: KwanzaaConfig, run, device: str, optimizer: str,
                             gradient_checkpointing: bool, precision: str = "float32") -> TrainingArguments:
    """The Trainer's arguments; `precision` is the resolved model.precision (it sets autocast)."""
    t, e = config.training, config.evaluation
    early = e.early_stopping_patience is not None
    return TrainingArguments(
        output_dir=str(run.path),
        **schedule_arguments(config),
        max_steps=t.max_steps,
        per_device_eval_batch_size=t.per_device_batch_size,
        optim=optimizer,
        **checkpointing_arguments(gradient_checkpointing),
        logging_steps=t.logging_steps,
        eval_strategy="steps",
        eval_steps=e.eval_steps,
        # Evaluation needs only the loss: without this the Trainer gathers every batch's logits
        # (positions x vocabulary) until the pass ends.
        prediction_loss_only=True,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # The reporting callbacks come from RunMonitor, after MetricsRecorder so they see what it adds.
        **runtime_arguments(config, device, precision),
        include_num_input_tokens_seen="non_padding" if config.data.batching == "length_grouped" else "all",
        train_sampling_strategy="group_by_length" if config.data.batching == "length_grouped" else "random",
        remove_unused_columns=False,
    )


def stage_callbacks(config: KwanzaaConfig, tracker: MetricsTracker | None, reporters: tuple, notes: list) -> list:
    """The callbacks every training stage runs with: metrics history, the backends, heap release, faults."""
    extra = [MetricsRecorder(tracker), *reporters]
    if config.training.release_host_memory:
        if can_release_free_heap():
            extra.append(ReleaseHostMemory())
        else:
            notes.append("training.release_host_memory: this C library has no malloc_trim (not glibc); the heap's "
                         "free pages stay resident and the resident memory may grow step after step")
            log.warning(notes[-1])
    if fault_injection_enabled():
        extra.append(FaultInjection())
    return extra


def add_progress_and_resume_callbacks(trainer: Trainer, resume_from: str | None) -> None:
    if trainer.pop_callback(ProgressCallback) is not None:  # the bar, unless disable_tqdm
        trainer.add_callback(TokensPerSecondProgress())
    if resume_from is not None:
        trainer.add_callback(ResumeRecorder(trainer.resume_record))


def run_trainer(config: KwanzaaConfig, bundle, datasets, run, identity: RunIdentity, resume: bool = False,
                callbacks: tuple = (), reporters: tuple = ()) -> TrainingOutcome:
    """Train; `reporters` are the backends' callbacks. Only the main process writes the history and summary.

    `identity` is sealed into every checkpoint; resuming checks it against the newest checkpoint's.
    """
    resume_from = str(checkpoint_to_resume(run.path, identity)) if resume else None
    optimizer, note = choose_optimizer(config.training.optimizer, bundle.device)
    notes = [note] if note else []
    if note:
        log.warning(note)
    args = build_training_arguments(config, run, bundle.device, optimizer, bundle.gradient_checkpointing,
                                    bundle.precision.resolved)
    main = args.process_index == 0
    tracker = MetricsTracker(run.path, resume=resume) if main else None
    extra = stage_callbacks(config, tracker, reporters, notes)
    if config.evaluation.early_stopping_patience is not None:
        extra.append(EarlyStoppingCallback(config.evaluation.early_stopping_patience,
                                           config.evaluation.early_stopping_threshold))
    trainer = KwanzaaTrainer(
        model=bundle.model,
        args=args,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval,
        data_collator=SupervisedLogitsCollator(make_collator(config.data.batching, bundle.tokenizer)),
        compute_loss_func=supervised_loss,
        processing_class=bundle.tokenizer,
        callbacks=[*extra, *callbacks],
        identity=identity,
    )
    add_progress_and_resume_callbacks(trainer, resume_from)
    result = trainer.train(resume_from_checkpoint=resume_from)
    if resume_from is not None:
        log.info("resumed from %s: %s", resume_from, json.dumps(trainer.resume_record, sort_keys=True))
    final_eval = _final_evaluation(trainer)
    bundle.model.eval()
    if not main:
        return TrainingOutcome({}, [], dict(result.metrics), final_eval, optimizer, notes)
    summary = tracker.summary()
    summary.update(final_eval_loss=final_eval["eval_loss"], final_perplexity=final_eval["eval_perplexity"],
                   stopped_early=result.global_step < trainer.state.max_steps,
                   train_runtime=result.metrics.get("train_runtime"),
                   train_tokens=trainer.state.num_input_tokens_seen,
                   eval_seconds=sum(h.get("eval_runtime", 0.0) for h in trainer.state.log_history),
                   resume=trainer.resume_record or None,
                   padding_share=trainer.padding_tokens / trainer.computed_tokens if trainer.computed_tokens else 0.0)
    if torch.cuda.is_available():
        summary["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    run.summary_path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return TrainingOutcome(summary, [m.to_dict() for m in tracker.history], dict(result.metrics), final_eval,
                           optimizer, notes)
