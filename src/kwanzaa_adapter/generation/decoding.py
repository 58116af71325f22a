"""Greedy, batched decoding of chat prompts, optionally held to the answer contract's grammar.

Evaluation, the preference stage's mining and the backend all decode through `generate` (or, for
the server's batches, through `end_of_turn_ids` and `left_padding`), so every path stops, pads and
counts tokens the same way.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from kwanzaa_adapter.generation.gate import AnswerabilityGate, GateLogits, gate_tap
from kwanzaa_adapter.generation.grammar import ContractLogits, SchemaGrammar


@dataclass(frozen=True)
class GenerationResult:
    """Decoded outputs in prompt order; `token_ids` are the new tokens before the end-of-turn token."""

    outputs: list[str]
    new_tokens: int
    seconds: float
    token_ids: list[list[int]] = field(default_factory=list)
    # With a gate (or forced decisions): True = refuse, False = answer, per prompt; and the gate's P(refuse).
    refuse: list[bool | None] = field(default_factory=list)
    refuse_probabilities: list[float | None] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    grammar: SchemaGrammar | None = None,
    gate: AnswerabilityGate | None = None,
    forced: Sequence[bool] | None = None,
    llamacpp=None,
) -> GenerationResult:
    """Greedy, batched decoding of chat prompts; outputs come back in prompt order.

    Prompts are sorted by length so each batch pads little; decoding stops at the end-of-turn
    token, and only the new tokens are decoded and counted (padding after it is not). With a
    `grammar`, every output is held to the answer contract (constrained decoding). With a `gate`,
    each answer's decision (answer or refuse) is the gate's, read from the prefill; with `forced`,
    it is given (True = refuse, one per prompt). With `llamacpp` (a `llamacpp.LlamaCppEngine`, on a
    model derived from `model`), it decodes the same prompt tokens in the same way.
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1; got {batch_size} and {max_new_tokens}")
    encoded = [_encode(tokenizer, prompt) for prompt in prompts]
    if llamacpp is not None:
        return llamacpp.generate(tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               stop_ids=end_of_turn_ids(model, tokenizer), progress=progress, grammar=grammar,
                               gate=gate, forced=forced)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    stop_ids = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    if forced is not None and len(forced) != len(prompts):
        raise ValueError(f"{len(forced)} forced decisions for {len(prompts)} prompts")
    new_ids: list[list[int]] = [[] for _ in prompts]
    refuse: list[bool | None] = [None] * len(prompts)
    probabilities: list[float | None] = [None] * len(prompts)
    outputs: list[str] = [""] * len(prompts)
    counted = 0
    start = time.perf_counter()
    with _eval_mode(model), left_padding(tokenizer), torch.inference_mode():
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
        for first in range(0, len(order), batch_size):
            indices = order[first : first + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, return_tensors="pt").to(device)
            prompt_length = batch["input_ids"].shape[1]
            processors = [ContractLogits(grammar, len(indices), prompt_length, stop_ids)] if grammar else []
            with gate_tap(model, gate if forced is None else None) as tap:
                if gate is not None or forced is not None:
                    holding = GateLogits(tokenizer, prompt_length, gate=gate, tap=tap,
                                         forced=[forced[i] for i in indices] if forced is not None else None)
                    processors.append(holding)
                generated = model.generate(
                **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                    use_cache=True,
                    stopping_criteria=StoppingCriteriaList([NotAJsonObject(tokenizer, prompt_length)]),
                    logits_processor=LogitsProcessorList(processors),
                )
            if gate is not None or forced is not None:
                for position, index in enumerate(indices):
                    refuse[index] = holding.refuse[position]
                    probabilities[index] = holding.probabilities[position]
            for row, index in zip(generated[:, prompt_length:].tolist(), indices):
                tokens, stopped = until_stop(row, [*stop_ids, pad_id])
                new_ids[index] = tokens
                counted += len(tokens) + stopped
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True)
            bar.update(len(indices))
        bar.close()
    return GenerationResult(outputs, counted, time.perf_counter() - start, new_ids, refuse, probabilities)


def sampler(temperature: float, top_p: float, generator: torch.Generator | None = None):
    """Temperature and nucleus (top-p) sampling of one row of scores; None (greedy) at temperature 0.
    `generator` (a CPU generator) is the row's own random state; None draws from torch's global one.

    The draw is Gumbel-max (the argmax of the scores plus Gumbel noise, one value per token), not the
    inverse of the cumulative distribution: the same noise picks the same token from scores that differ
    in the last bits (a row alone or in a padded batch, on either engine), where a cumulative sum over the
    vocabulary shifts every bin and would flip a draw every few tokens."""
    if temperature <= 0:
        return None

    def sample(scores: torch.Tensor) -> int:
        logits = scores.float().cpu() / temperature
        if top_p < 1.0:
            ordered, indices = torch.sort(torch.softmax(logits, dim=-1), descending=True)
            outside = torch.cumsum(ordered, dim=-1) - ordered >= top_p  # beyond the smallest set reaching top_p
            logits[indices[outside]] = float("-inf")
        uniform = torch.rand(logits.shape, generator=generator).clamp_(min=torch.finfo(torch.float32).tiny)
        return int(torch.argmax(logits - torch.log(-torch.log(uniform))))
    return sample


def request_sampler(temperature: float, top_p: float, seed: int | None = None):
    """`sampler` with a random state of the request's own: from `seed`, the same tokens for the same seed and
    scores whatever else is generated beside it (a batch, another engine's thread); unseeded, a fresh one."""
    if temperature <= 0:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return sampler(temperature, top_p, generator)


class NotAJsonObject(StoppingCriteria):
    """Ends a sequence as soon as its output cannot be a JSON object (first visible char not '{').

    `parse_answer` rejects such an output whatever follows, so stopping there changes no metric;
    it only spares generating up to max_new_tokens of prose.
    """

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = [cannot_be_json(self.tokenizer, row) for row in input_ids[:, self.prompt_length :].tolist()]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def cannot_be_json(tokenizer, tokens: list[int]) -> bool:
    """Whether new tokens can no longer open a JSON object: their visible text has begun, not with '{'."""
    text = tokenizer.decode(tokens[:4], skip_special_tokens=True).lstrip()
    return bool(text) and not text.startswith("{")


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus the generation config's eos ids: any of them ends a turn."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if candidate is not None and candidate not in ids:
            ids.append(candidate)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an eos token; set tokenizer.eos_token")
    return ids


def _encode(tokenizer, prompt: list[dict]) -> list[int]:
    encoding = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(encoding["input_ids"])


def until_stop(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(row):
        if token in stop_ids:
            return row[:position], True
    return row, False


@contextmanager
def left_padding(tokenizer) -> Iterator[None]:
    # Decoder-only models continue from the last position, so padding must sit on the left.
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
