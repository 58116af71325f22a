"""The preference stage's trainer: TRL's `DPOTrainer` with the supervised stage's sealed checkpoints,
schedule, precision and callbacks (`trainer`), for one round of `training.preference`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.evaluation.metrics import MetricsTracker
from kwanzaa_adapter.training.checkpointing import RunIdentity
from kwanzaa_adapter.training.trainer import (
    SealedCheckpoints,
    add_progress_and_resume_callbacks,
    checkpointing_arguments,
    choose_optimizer,
    runtime_arguments,
    schedule_arguments,
    stage_callbacks,
)

log = logging.getLogger(__name__)


def preference_arguments(config: KwanzaaConfig, directory: Path, device: str, optimizer: str,
                         gradient_checkpointing: bool, precision: str = "float32"):
    """TRL's DPOConfig for one round of `training.preference`: the run's schedule and checkpoint settings,
    the stage's own epochs, rate and accumulation, the reference log-probabilities computed once."""
    from trl import DPOConfig

    p, t = config.training.preference, config.training
    schedule = {**schedule_arguments(config), "num_train_epochs": p.num_epochs, "learning_rate": p.learning_rate,
                "gradient_accumulation_steps": p.gradient_accumulation_steps}
    loss = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, p.sft_weight]} if p.sft_weight \
        else {"loss_type": ["sigmoid"]}
    return DPOConfig(
        output_dir=str(directory),
        **schedule,
        **loss,
        beta=p.beta,
        max_length=config.data.max_seq_length,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=t.per_device_batch_size,
        optim=optimizer,
        **checkpointing_arguments(gradient_checkpointing, DPOConfig),
        logging_steps=t.logging_steps,
        eval_strategy="no",
        **runtime_arguments(config, device, precision),
        include_num_input_tokens_seen="all",
    )


def _dpo_trainer_class():
    from trl import DPOTrainer

    class KwanzaaDPOTrainer(SealedCheckpoints, DPOTrainer):
        """TRL's DPOTrainer with sealed checkpoints. TRL copies the adapter it is given into a frozen `ref`
        adapter and computes the reference log-probabilities with it while it initialises; the copy is
        deleted then, so that the optimizer, the checkpoints and the artifact hold the trained adapter only.

        TRL also rounds a quantized model's trainable adapter weights to bf16 (the QLoRA paper's choice):
        the weights the supervised stage trained are put back as they were, so the stage continues the
        same adapter in the same precision (and bf16 is 150x slower than fp32 on an AVX2 CPU).
        """

        def __init__(self, *args, identity: RunIdentity, model, **kwargs):
            trained = {name: param.data for name, param in model.named_parameters() if param.requires_grad}
            super().__init__(*args, model=model, identity=identity, **kwargs)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if "ref" in unwrapped.peft_config:
                unwrapped.delete_adapter("ref")
                unwrapped.set_adapter("default")
            for name, param in unwrapped.named_parameters():
                if name in trained:
                    param.data = trained[name]

    return KwanzaaDPOTrainer


def run_preference_trainer(config: KwanzaaConfig, bundle, directory: Path, rows: list[dict], identity: RunIdentity,
                           resume_from: Path | None, callbacks: tuple = (), reporters: tuple = ()) -> dict:
    """One round of DPO on `rows` (TRL's conversational prompt/chosen/rejected) over `bundle.model`'s adapter."""
    from datasets import Dataset

    optimizer, _ = choose_optimizer(config.training.optimizer, bundle.device)
    args = preference_arguments(config, directory, bundle.device, optimizer, bundle.gradient_checkpointing,
                                bundle.precision.resolved if bundle.precision else "float32")
    tracker = MetricsTracker(directory, resume=resume_from is not None) if args.process_index == 0 else None
    trainer = _dpo_trainer_class()(
        model=bundle.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=bundle.tokenizer,
        callbacks=[*stage_callbacks(config, tracker, reporters, []), *callbacks],
        identity=identity,
    )
    resume = str(resume_from) if resume_from is not None else None
    add_progress_and_resume_callbacks(trainer, resume)
    result = trainer.train(resume_from_checkpoint=resume)
    if resume is not None:
        log.info("preference: resumed from %s: %s", resume, json.dumps(trainer.resume_record, sort_keys=True))
    bundle.model.eval()
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    accuracies = [h["rewards/accuracies"] for h in history if "rewards/accuracies" in h]
    return {"steps": trainer.state.global_step, "train_seconds": round(result.metrics.get("train_runtime", 0.0), 1),
            "train_tokens": trainer.state.num_input_tokens_seen, "final_loss": losses[-1] if losses else None,
            "reward_accuracy": accuracies[-1] if accuracies else None,
            "resume": trainer.resume_record or None}  # what resuming loaded, as the trainer recorded it
