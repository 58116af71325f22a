"""Bytes autograd keeps for the backward pass of the longest training row, storages counted once.

    python bench/experiments/saved_tensors.py [--set key.path=value ...]

The demo config with the given overrides, one forward pass of its longest training row under
`saved_tensors_hooks`; prints a JSON line with the total and the five largest saved storages.
"""

from __future__ import annotations

import argparse
import json

import torch

from kwanzaa_adapter.data.collation import make_collator
from kwanzaa_adapter.data.supervised_logits import SupervisedLogitsCollator, supervised_loss
from kwanzaa_adapter.modeling import loading as modeling
from kwanzaa_adapter.training.workflow import ModelBundle, load_configuration, load_datasets

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
args = parser.parse_args()
config = load_configuration("configs/demo.yaml", tuple(args.set), None)
precision = modeling.run_precision(config, "cpu").resolved
model, tokenizer, source = modeling.load_base_model(config, "cpu", precision)
model = modeling.add_adapter(model, config, gradient_checkpointing=False)
model.train()
rows = load_datasets(config, ModelBundle(model, tokenizer, source, "cpu", {})).train
row = max(rows, key=lambda f: len(f["input_ids"]))
batch = SupervisedLogitsCollator(make_collator("packed", tokenizer))([row])
labels = batch.pop("labels")
storages: dict[int, tuple[int, str]] = {}


def keep(tensor: torch.Tensor) -> torch.Tensor:
    storage = tensor.untyped_storage()
    storages[storage.data_ptr()] = (storage.nbytes(), f"{tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}")
    return tensor


with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
        loss = supervised_loss(model(**batch), labels)
loss.backward()
largest = sorted(storages.values(), reverse=True)[:5]
print(json.dumps({"overrides": args.set, "precision": precision, "tokens": len(row["input_ids"]),
                  "saved_mb": round(sum(n for n, _ in storages.values()) / 1e6, 1), "storages": len(storages),
                  "largest": [f"{n / 1e6:.1f} MB {what}" for n, what in largest]}))
