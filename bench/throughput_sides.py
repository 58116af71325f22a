"""The child process of bench/throughput.py: one side trains once and writes its measurements as JSON.

`child()` runs ours (`train_adapter()`) or the TRL SFTTrainer recipe (`train_trl()`, which
bench/gpu_check.py also runs on a GPU), with `_Counter` counting the tokens of every micro-batch and
the `_probe_callback()` callback timing the training loop; then `assistant_token_loss()` scores the
trained model the same way for every side. Imported by throughput.py, which puts bench/ on sys.path.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from throughput_report import sequence_lengths

IGNORE_INDEX = -100


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
