"""Batches for training: padding-free packing, and a length-grouped padded fallback.

Packing puts a whole batch in one row with `position_ids` restarting at 0 per sample and no
attention_mask. transformers then builds a block-diagonal causal mask from the position_ids
(`masking_utils.find_packed_sequence_indices`), but only when there is no KV cache: a model
whose config says `use_cache=True` creates one even in training and the samples would then
attend to each other. The packed batch therefore carries `use_cache=False` itself.
"""

from __future__ import annotations

import random
from typing import Iterable, Mapping, Sequence

import torch
from transformers import DataCollatorWithFlattening

from kwanzaa_adapter.data.chat_template import IGNORE_INDEX, TokenizedExample

Feature = Mapping[str, Sequence[int]] | TokenizedExample


def _as_features(features: Sequence[Feature]) -> list[dict]:
    return [f.as_features() if isinstance(f, TokenizedExample) else dict(f) for f in features]


class PackedCollator:
    """One flattened row per batch: `input_ids`, `labels` (first token of each sample ignored),
    `position_ids` restarting per sample, `use_cache=False`; no padding, no attention_mask."""

    def __init__(self) -> None:
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def __call__(self, features: Sequence[Feature]) -> dict:
        features = _as_features(features)
        if any("labels" not in f for f in features):
            raise ValueError("PackedCollator needs labels in every feature (tokenize with tokenize_conversation)")
        batch = dict(self._flatten(features, return_tensors="pt"))
        batch["use_cache"] = False
        return batch


class PaddedCollator:
    """Right-pads to the longest sample in the batch: attention_mask 0 and labels -100 on padding.

    Written out rather than wrapping DataCollatorForSeq2Seq, which pads on the tokenizer's
    `padding_side` (left for some chat tokenizers) and would shift training positions.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[Feature]) -> dict[str, torch.Tensor]:
        features = _as_features(features)
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            length = len(feature["input_ids"])
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"])
            labels[row, :length] = torch.as_tensor(feature.get("labels", feature["input_ids"]))
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def plan_batches(
    lengths: Sequence[int], max_tokens: int, *, padded: bool = True, seed: int | None = None
) -> list[list[int]]:
    """Group sample indices into batches of at most `max_tokens` computed tokens.

    Samples are taken longest first, so each batch holds similar lengths and padding waste is
    small (`padded=True` counts batch size x longest; `padded=False` counts the packed sum).
    The longest batch comes first so an out-of-memory shows at step one; `seed` shuffles the
    batch order instead.
    """
    if lengths and max(lengths) > max_tokens:
        raise ValueError(f"max_tokens {max_tokens} is below the longest sample ({max(lengths)} tokens); "
                         f"raise it to at least {max(lengths)}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        candidate = current + [index]
        if current and _cost([lengths[i] for i in candidate], padded) > max_tokens:
            batches.append(current)
            candidate = [index]
        current = candidate
    if current:
        batches.append(current)
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def _cost(lengths: Sequence[int], padded: bool) -> int:
    return len(lengths) * max(lengths) if padded else sum(lengths)


def padding_share(batches: Iterable[Mapping[str, torch.Tensor]]) -> float:
    """Padding tokens / computed tokens over collated batches (0.0 for packed batches)."""
    padding = computed = 0
    for batch in batches:
        computed += batch["input_ids"].numel()
        mask = batch.get("attention_mask")
        if mask is not None:
            padding += int((mask == 0).sum())
    return padding / computed if computed else 0.0


def make_collator(batching: str, tokenizer) -> PackedCollator | PaddedCollator:
    """The collator for `data.batching`: padding-free packing, or padded length-grouped batches."""
    if batching == "packed":
        return PackedCollator()
    return PaddedCollator(tokenizer.pad_token_id)
