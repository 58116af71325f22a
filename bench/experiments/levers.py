"""Training and forward tokens/s of the demo model: precision, and LoRA on every block or the last N only."""

from __future__ import annotations

import json
import sys
import time

import torch

from kwanzaa_adapter.data.collation import make_collator
from kwanzaa_adapter.data.supervised_logits import SupervisedLogitsCollator, supervised_loss
from kwanzaa_adapter.modeling import loading as modeling
from kwanzaa_adapter.training.workflow import ModelBundle, load_configuration, load_datasets


def measure(precision: str, top_layers: int | None) -> dict:
    overrides = [f"model.precision={precision}"] + ([f"adapter.top_layers={top_layers}"] if top_layers else [])
    config = load_configuration("configs/demo.yaml", tuple(overrides), None)
    torch.manual_seed(0)
    model, tokenizer, source = modeling.load_base_model(config, "cpu", precision)
    model = modeling.add_adapter(model, config, gradient_checkpointing=False)
    rows = load_datasets(config, ModelBundle(model, tokenizer, source, "cpu", {})).train[:12]
    collate = SupervisedLogitsCollator(make_collator("packed", tokenizer))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16")
    model.train()

    def step(row):
        batch = collate([row])
        labels = batch.pop("labels")
        with torch.autocast(**autocast):
            outputs = model(**batch)
        supervised_loss(outputs, labels).backward()
        optimizer.step()
        optimizer.zero_grad()

    for row in rows[:2]:
        step(row)
    tokens = sum(len(row["input_ids"]) for row in rows[2:])
    tick = time.perf_counter()
    for row in rows[2:]:
        step(row)
    train_seconds = time.perf_counter() - tick
    tick = time.perf_counter()
    with torch.no_grad(), torch.autocast(**autocast):
        for row in rows[2:]:
            batch = collate([row])
            batch.pop("labels")
            model(**batch)
    forward_seconds = time.perf_counter() - tick
    return {"precision": precision, "top_layers": top_layers, "tokens": tokens,
            "train_tok_s": round(tokens / train_seconds, 1), "forward_tok_s": round(tokens / forward_seconds, 1)}


if __name__ == "__main__":
    precision, layers = sys.argv[1], [int(n) for n in sys.argv[2:]] or [0]
    for n in layers:
        print(json.dumps(measure(precision, n or None)), flush=True)
