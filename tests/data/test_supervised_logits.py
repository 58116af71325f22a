"""Logits at supervised positions only: the same loss and gradients as the model's own loss."""

from __future__ import annotations

import torch

from conftest import ROOT
from kwanzaa_adapter.data.collation import make_collator
from kwanzaa_adapter.data.supervised_logits import SupervisedLogitsCollator, supervised_loss
from kwanzaa_adapter.data.tokenization import tokenize_file


def _batch(tokenizer, batching: str, rows: int = 3):
    examples, _ = tokenize_file(ROOT / "data/kwanzaa_eval.jsonl", tokenizer, 1024)
    features = [e.as_features() for e in examples[:rows]]
    return SupervisedLogitsCollator(make_collator(batching, tokenizer))(features)


def test_supervised_logits_loss_equals_the_models_own_loss(tiny_llama, tokenizer):
    for batching in ("packed", "length_grouped"):
        batch = _batch(tokenizer, batching)
        keep = batch.pop("logits_to_keep")
        labels = batch["labels"]
        reference = tiny_llama(**batch).loss
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        outputs = tiny_llama(**inputs, logits_to_keep=keep)
        assert outputs.logits.shape[1] == keep.numel() < labels.shape[1] / 2
        torch.testing.assert_close(supervised_loss(outputs, labels), reference, rtol=1e-5, atol=1e-5)


def test_supervised_logits_give_the_same_gradients(tiny_llama, tokenizer):
    batch = _batch(tokenizer, "packed", rows=2)
    keep = batch.pop("logits_to_keep")
    count = int((batch["labels"][:, 1:] != -100).sum())
    tiny_llama.train()
    tiny_llama(**batch, num_items_in_batch=count).loss.backward()
    reference = tiny_llama.model.layers[0].self_attn.q_proj.weight.grad.clone()
    tiny_llama.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    supervised_loss(tiny_llama(**inputs, logits_to_keep=keep), batch["labels"], count).backward()
    torch.testing.assert_close(tiny_llama.model.layers[0].self_attn.q_proj.weight.grad, reference,
                               rtol=1e-4, atol=1e-7)
