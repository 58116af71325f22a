"""What the model reads: how much attention the question's tokens pay to each document sentence.

A causal model reads the documents before the question, so a sentence's own hidden states cannot know
what is asked; the question's tokens, which come after, look back at the sentences that answer them.
`ReadingTap` keeps that look: while it is active, every attention block of the model runs through
`READING`, an attention function registered with transformers' `AttentionInterface` (the library's own
extension point) that computes the block's output exactly as SDPA does and, beside it, the softmax of
the question rows over all keys, averaged over the question's tokens. `read_prompts` sums it over
each candidate sentence's tokens: one value per block and head, the evidence selector's features.
`read_prompts` reads them in the same pass as the answerability gate's block outputs, so that training
fits both read-outs on one forward pass over the decision examples.

Token spans come from the tokenizer's offsets on the rendered prompt (a fast tokenizer is needed).
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from kwanzaa_adapter.data.records import QUESTION_LABEL
from kwanzaa_adapter.generation.gate import LayerTap, decoder_layers

READING = "kwanzaa_reading"
_ACTIVE: contextvars.ContextVar[ReadingTap | None] = contextvars.ContextVar("kwanzaa_reading_tap", default=None)


class ReadingError(ValueError):
    """A prompt whose sentences cannot be located in its tokens (or a tokenizer without offsets)."""


@dataclass(frozen=True)
class ReadPrompt:
    """A prompt's token ids, the token positions of each candidate sentence, and of its question."""

    ids: list[int]
    sentences: list[list[int]]
    question: list[int]


def read_prompt(tokenizer, messages: Sequence[dict], sentences: Sequence[tuple[str, str]]) -> ReadPrompt:
    """Tokenize the rendered prompt with offsets and find each (document text, sentence) in it, in order:
    a sentence is searched within its document's text, documents one after the other."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ReadingError(f"the evidence selector needs a fast tokenizer with offsets: {exc}") from None
    offsets = encoded["offset_mapping"]
    spans, cursor, document, start = [], 0, None, 0
    for document_text, sentence in sentences:
        if document_text is not document:
            found = text.find(document_text, cursor)
            if found < 0:
                raise ReadingError(f"document text not found in the rendered prompt: {document_text[:40]!r}")
            document, start, cursor = document_text, found, found + len(document_text)
        at = text.find(sentence, start)
        if at < 0:
            raise ReadingError(f"sentence not found in its document: {sentence[:40]!r}")
        end, start = at + len(sentence), at + len(sentence)
        spans.append([i for i, (a, b) in enumerate(offsets) if a < end and b > at])
    asked = text.rfind(QUESTION_LABEL)
    if asked < 0:
        raise ReadingError(f"no {QUESTION_LABEL!r} in the rendered prompt")
    question = [i for i, (_, b) in enumerate(offsets) if b > asked + len(QUESTION_LABEL)]
    return ReadPrompt(list(encoded["input_ids"]), spans, question)


class ReadingTap:
    """While active (a context manager over a forward pass of a left-padded batch), keeps each block's
    attention from the question rows of every prompt, averaged over them: {layer: batch x heads x keys}."""

    def __init__(self, model, question_rows: torch.Tensor, key_mask: torch.Tensor):
        self.model, self.rows, self.key_mask = model, question_rows, key_mask  # batch x last rows; batch x keys
        self.captured: dict[int, torch.Tensor] = {}
        self._token = None
        self._previous = None

    def __enter__(self) -> ReadingTap:
        _register()
        config = self.model.config
        self._previous = config._attn_implementation
        self.model.set_attn_implementation(READING)
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self.model.set_attn_implementation(self._previous)

    def observe(self, layer: int, module, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        rows = self.rows.shape[1]
        key = repeat_kv(key, getattr(module, "num_key_value_groups", 1))
        # In float32 whatever autocast runs the model in (the bf16 training precision would round the softmax).
        with torch.autocast(device_type=query.device.type, enabled=False):
            scores = (query[:, :, -rows:, :].float() @ key.float().transpose(-1, -2)) * scaling  # b x h x rows x keys
            keys, device = key.shape[2], query.device
            causal = torch.arange(keys, device=device)[None, :] <= torch.arange(keys - rows, keys, device=device)[:, None]
            allowed = causal[None, None] & self.key_mask.to(device)[:, None, None, :]  # b x 1 x rows x keys
            probabilities = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            weights = self.rows.to(device).float()
            weights = weights / weights.sum(dim=1, keepdim=True)  # b x rows
            self.captured[layer] = torch.einsum("bhrk,br->bhk", probabilities, weights).cpu()


def _reading_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """SDPA's output, unchanged; with a tap active, the question rows' attention is kept beside it."""
    tap = _ACTIVE.get()
    if tap is not None:
        tap.observe(module.layer_idx, module, query, key, scaling if scaling is not None else module.scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _register() -> None:
    if READING not in AttentionInterface._global_mapping:
        AttentionInterface.register(READING, _reading_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(READING, sdpa_mask)


@dataclass
class Reading:
    """What one pass read: per prompt the question's attention to each sentence (sentences x depth*heads; None
    without a depth), and per tapped block the output at each prompt's last token (prompts x width)."""

    attention: list[torch.Tensor | None]
    block_outputs: dict[int, torch.Tensor]


@torch.no_grad()
def read_prompts(model, tokenizer, prompts: Sequence[ReadPrompt], *, depth: int | None = None,
                 layers: Sequence[int] = (), batch_size: int = 4, progress=None) -> Reading:
    """One forward pass per batch of left-padded prompts (longest first), stopped after the deepest block asked
    for: the attention the question pays to each sentence in blocks 1..`depth`, and the outputs of the blocks
    `layers` at the last token (the answerability gate's features, as `gate.prompt_features` reads them)."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    deepest = max([*layers, depth or 0]) or len(decoder_layers(model))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].ids), reverse=True)
    attention: list[torch.Tensor | None] = [None] * len(prompts)
    outputs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    try:
        for first in range(0, len(order), batch_size):
            indices = order[first: first + batch_size]
            batch = [prompts[i] for i in indices]
            width = max(len(p.ids) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p.ids)) + p.ids for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch], device=device)
            with LayerTap(model, [*layers, deepest], stop_after_last=True) as tap, \
                    ReadingTap(model, _question_rows(batch, width), mask.bool().cpu()) if depth else nullcontext() as read:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer in layers:
                outputs[layer].append(tap.captured[layer])
            for row, (index, p) in enumerate(zip(indices, batch)):
                if depth:
                    shift = width - len(p.ids)
                    blocks = torch.stack([read.captured[block][row] for block in range(depth)])  # depth x heads x keys
                    attention[index] = torch.stack([blocks[:, :, [i + shift for i in span]].sum(-1).flatten()
                                                    for span in p.sentences])
            if progress is not None:
                progress(len(batch))
    finally:
        model.train(was_training)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return Reading(attention, {layer: torch.cat(parts)[inverse] for layer, parts in outputs.items()})


def _question_rows(batch: Sequence[ReadPrompt], width: int) -> torch.Tensor:
    """batch x rows: which of the batch's last rows are the question tokens of each (left-padded) prompt."""
    rows = max(len(p.ids) - min(p.question) for p in batch)  # the last rows hold every question
    marked = torch.zeros(len(batch), rows, dtype=torch.bool)
    for row, p in enumerate(batch):
        shift = width - len(p.ids)
        for position in p.question:
            marked[row, position + shift - (width - rows)] = True
    return marked
