"""Training tokens/s with one row per micro-batch (packed) against 2 and 4 length-sorted rows, padded."""

from __future__ import annotations

import json
import sys
import time

import torch

from kwanzaa_adapter.data.collation import make_collator
from kwanzaa_adapter.data.supervised_logits import SupervisedLogitsCollator, supervised_loss
from kwanzaa_adapter.modeling import loading as modeling
from kwanzaa_adapter.training.workflow import ModelBundle, load_configuration, load_datasets

precision = sys.argv[1]
config = load_configuration("configs/demo.yaml", (f"model.precision={precision}",), None)
torch.manual_seed(0)
model, tokenizer, source = modeling.load_base_model(config, "cpu", precision)
model = modeling.add_adapter(model, config, gradient_checkpointing=False)
rows = sorted(load_datasets(config, ModelBundle(model, tokenizer, source, "cpu", {})).train[:48],
              key=lambda f: len(f["input_ids"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
model.train()


def step(batch, collate):
    inputs = collate(batch)
    labels = inputs.pop("labels")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        outputs = model(**inputs)
    supervised_loss(outputs, labels).backward()
    optimizer.step()
    optimizer.zero_grad()


for size, batching in ((1, "packed"), (2, "length_grouped"), (4, "length_grouped"), (1, "packed")):
    collate = SupervisedLogitsCollator(make_collator(batching, tokenizer))
    step(rows[:size], collate)
    tokens, tick = 0, time.perf_counter()
    for first in range(8, 40, size):
        batch = rows[first:first + size]
        step(batch, collate)
        tokens += sum(len(f["input_ids"]) for f in batch)
    print(json.dumps({"precision": precision, "rows_per_batch": size, "batching": batching,
                      "train_tok_s": round(tokens / (time.perf_counter() - tick), 1)}), flush=True)
