"""Logits only where a label is supervised.

About three quarters of each sample is prompt, whose positions carry no label, yet a causal LM
computes vocabulary logits (and their fp32 up-cast) for every position. The collator asks the
model for logits at the supervised positions only (`logits_to_keep`, a transformers forward
argument), and `supervised_loss` scores exactly those: the same loss as the model's own
(sum of token cross-entropies over `num_items_in_batch`), for less compute and memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions p whose next token labels[p + 1] is supervised, in any row of the batch."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)


class SupervisedLogitsCollator:
    """Wraps a collator: adds `logits_to_keep` = the supervised positions of the batch."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features) -> dict:
        batch = self.collator(features)
        batch["logits_to_keep"] = supervised_positions(batch["labels"])
        return batch


def supervised_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of the kept logits against the next-token labels (Trainer's compute_loss_func)."""
    positions = supervised_positions(labels)
    targets = labels[:, 1:][:, positions].to(outputs.logits.device)
    logits = outputs.logits.float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
    return total / count
