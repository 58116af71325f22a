"""The answerability gate: a linear read-out of one layer's hidden state that decides answer or refuse.

The adapted model knows in its middle layers whether the documents hold the answer better than its
generated tokens show (../shared/ANSWERABILITY.md). The gate reads the output of one decoder block
at the prompt's last token, during the prefill that generation does anyway (`LayerTap`, a forward
hook: no extra pass), turns it into a refusal probability, and compares that with a threshold
chosen at training time. `GateLogits` then forces only the decision, as text, while the model writes
everything else: the answer text opens with "The documents do not" and `completeness` is
`insufficient_data` for a refusal; for an answer, neither.

The gate is one small safetensors file inside the artifact (`GATE_FILE`): the weights and the
standardisation of the features as tensors, the layer, position and threshold in its header.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor

from kwanzaa_adapter.generation.readout_file import load_readout, save_readout

GATE_FILE = "answerability_gate.safetensors"
GATE_FORMAT = "kwanzaa.gate.v1"
POSITION = "prompt_end"  # the last token of the prompt, generation prompt included
# Every refusal the model was trained on opens its answer text with these words.
REFUSAL_OPENING = "The documents do not"
TEXT_KEY = '"text":"'
COMPLETENESS_KEY = '"completeness":"'
REFUSED_COMPLETENESS = 'insufficient_data"'
ANSWERED_COMPLETENESS = ('complete"', 'partial"')
# An answer may not open like a refusal: from these words on, the model has begun one (no gold answer
# of the shipped data opens so; a model told to answer what it would refuse writes "The document does
# not say" once "The documents" is barred).
ANSWER_MAY_NOT_OPEN = ("The document", "The text", "The source", "The note")
CANDIDATES_CHECKED = 16  # next-best tokens tried before the decision's own text is forced


class GateError(ValueError):
    """A gate file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class AnswerabilityGate:
    """P(refuse) = sigmoid(((h - mean) / scale) . weight + bias), h the output of block `layer`."""

    layer: int  # 1-based: the output of the layer-th decoder block (hidden_states[layer] before any norm)
    threshold: float  # refuse when the probability is above it
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    info: dict = field(default_factory=dict)  # how it was fitted: calibration AUC, examples, candidates

    def refuse_probability(self, features: torch.Tensor) -> torch.Tensor:
        """Rows of features (batch x hidden) -> one refusal probability per row."""
        standard = (features.float().cpu() - self.mean) / self.scale
        return torch.sigmoid(standard @ self.weight + self.bias)

    def refuses(self, probabilities: torch.Tensor) -> list[bool]:
        return [bool(p > self.threshold) for p in probabilities.tolist()]

    def describe(self) -> dict:
        return {"layer": self.layer, "position": POSITION, "threshold": round(self.threshold, 4),
                "width": int(self.weight.shape[0]), **self.info}

    def save(self, path: str | Path) -> Path:
        return save_readout(path, {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale},
                            {"format": GATE_FORMAT, "layer": str(self.layer), "position": POSITION,
                             "threshold": repr(float(self.threshold)), "info": json.dumps(self.info, sort_keys=True)})


def load_gate(artifact: str | Path, digests: Mapping[str, str] | None = None) -> AnswerabilityGate | None:
    """The gate of an artifact directory (verified by the caller; with `digests`, built only from the verified
    bytes), or None when it has none."""
    def build(header: dict, t: dict) -> AnswerabilityGate:
        return AnswerabilityGate(int(header["layer"]), float(header["threshold"]), t["weight"], t["bias"], t["mean"],
                                 t["scale"], json.loads(header.get("info", "{}")))

    return load_readout(artifact, GATE_FILE, digests, GateError, "a gate",
                        {"format": GATE_FORMAT, "position": POSITION}, build)


# --------------------------------------------------------------------------- features


def decoder_layers(model) -> torch.nn.ModuleList:
    """The model's stack of decoder blocks (through any PEFT wrapper)."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise GateError(f"cannot find the {count} decoder blocks of {type(model).__name__}")


class _Enough(Exception):
    """Raised from the deepest tapped block: the rest of the forward pass is not needed."""


class LayerTap:
    """Forward hooks that keep each tapped block's output at the last position of the first pass."""

    def __init__(self, model, layers: Sequence[int], stop_after_last: bool = False):
        blocks = decoder_layers(model)
        bad = [layer for layer in layers if not 1 <= layer <= len(blocks)]
        if bad:
            raise GateError(f"gate layer(s) {bad} outside the model's 1..{len(blocks)} blocks")
        self.blocks, self.layers, self.stop = blocks, sorted(set(layers)), stop_after_last
        self.captured: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> LayerTap:
        for layer in self.layers:
            self._handles.append(self.blocks[layer - 1].register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc[0] is _Enough  # the early stop is not an error

    def _hook(self, layer: int):
        def keep(module, args, output):
            if layer not in self.captured:  # the prefill; later passes are decoding steps
                hidden = output[0] if isinstance(output, tuple) else output
                self.captured[layer] = hidden[:, -1, :].detach().float().cpu()
            if self.stop and layer == self.layers[-1]:
                raise _Enough
        return keep


@torch.no_grad()
def prompt_features(model, tokenizer, prompts: Sequence[list[int]], layers: Sequence[int], *,
                    batch_size: int = 8, progress=None) -> dict[int, torch.Tensor]:
    """Features of each prompt (token ids) for each layer: one forward pass, stopped after the deepest
    tapped block. Left padding puts every prompt's last token at the last position."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    columns: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for first in range(0, len(order), batch_size):
        rows = [prompts[i] for i in order[first: first + batch_size]]
        width = max(len(row) for row in rows)
        ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
        with LayerTap(model, layers, stop_after_last=True) as tap:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        for layer in layers:
            columns[layer].append(tap.captured[layer])
        if progress is not None:
            progress(len(rows))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {layer: torch.cat(parts)[inverse] for layer, parts in columns.items()}


# --------------------------------------------------------------------------- forcing the decision


def _value_after(text: str, key: str) -> str | None:
    at = text.find(key)
    return None if at < 0 else text[at + len(key):]


def _on_path(value: str, targets: Sequence[str]) -> bool:
    """Whether `value` is on its way to one of `targets` or past it."""
    return any(target.startswith(value) or value.startswith(target) for target in targets)


def agrees(text: str, refuse: bool) -> bool:
    """Whether an output so far can still become the decided kind of answer."""
    content = _value_after(text, TEXT_KEY)
    if content is not None:
        if refuse and not _on_path(content, [REFUSAL_OPENING]):
            return False
        if not refuse and content.startswith(ANSWER_MAY_NOT_OPEN):
            return False
    value = _value_after(text, COMPLETENESS_KEY)
    if value is not None:
        return _on_path(value, [REFUSED_COMPLETENESS] if refuse else ANSWERED_COMPLETENESS)
    return True


def reached_decision(text: str) -> bool:
    """Whether an output reached a value the decision holds (the answer's text or its completeness). A reply
    in free text never does: on it the gate's decision could not act."""
    return _value_after(text, TEXT_KEY) is not None or _value_after(text, COMPLETENESS_KEY) is not None


def _missing(text: str, refuse: bool) -> str | None:
    """The decided words the output has not written yet, where it stands inside a forced value."""
    value = _value_after(text, COMPLETENESS_KEY)
    if value is not None:
        targets = [REFUSED_COMPLETENESS] if refuse else ANSWERED_COMPLETENESS
    else:
        value = _value_after(text, TEXT_KEY)
        targets = [REFUSAL_OPENING] if refuse and value is not None else []
    for target in targets:
        if target.startswith(value) and len(target) > len(value):
            return target[len(value):]
    return None


class GateLogits(LogitsProcessor):
    """Holds each row of a `generate` batch to its decision; the rest is the model's (and grammar's).

    At the first call the gate's tap holds the prefill's features: each active row's decision is
    made there (or taken from `forced`). At every step the row's best token is kept if the output
    can still become the decided answer; else the next best of `CANDIDATES_CHECKED` that can, else
    the first token of the decided words themselves.
    """

    def __init__(self, tokenizer, prompt_length: int, *, gate: AnswerabilityGate | None = None,
                 tap: LayerTap | None = None, forced: Sequence[bool | None] | None = None,
                 active: Sequence[bool] | None = None, on_decision=None):
        if gate is None and forced is None:
            raise ValueError("GateLogits needs a gate (with its tap) or forced decisions")
        self.tokenizer, self.prompt_length = tokenizer, prompt_length
        self.gate, self.tap, self.forced, self.active = gate, tap, forced, active
        self.on_decision = on_decision  # called (row, refuse, probability) as each row is decided
        self.refuse: list[bool | None] | None = None
        self.probabilities: list[float | None] = []

    def _decide(self, rows: int) -> None:
        active = list(self.active) if self.active is not None else [True] * rows
        if self.forced is not None:
            decided = list(self.forced)
            self.probabilities = [None] * rows
        else:
            probabilities = self.gate.refuse_probability(self.tap.captured[self.gate.layer])
            decided = self.gate.refuses(probabilities)
            self.probabilities = [round(p, 4) if on else None for p, on in zip(probabilities.tolist(), active)]
        self.refuse = [d if on else None for d, on in zip(decided, active)]
        if self.on_decision is not None:
            for row, (refuse, probability) in enumerate(zip(self.refuse, self.probabilities)):
                self.on_decision(row, refuse, probability)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.refuse is None:
            self._decide(input_ids.shape[0])
        for row, refuse in enumerate(self.refuse):
            if refuse is not None:
                scores[row] = self.hold(input_ids[row, self.prompt_length:].tolist(), scores[row], refuse)
        return scores

    def hold(self, ids: list[int], row_scores: torch.FloatTensor, refuse: bool) -> torch.FloatTensor:
        """One row's next-token scores, held to its decision."""
        decode = self.tokenizer.decode
        if not agrees(decode(ids, skip_special_tokens=True), refuse):
            return row_scores  # the output left the decided path before the gate could hold it
        scores = row_scores.clone()
        for _ in range(CANDIDATES_CHECKED):
            token = int(scores.argmax())
            if scores[token] == float("-inf"):
                break
            if agrees(decode([*ids, token], skip_special_tokens=True), refuse):
                return scores  # the best token that agrees, the ones before it vetoed
            scores[token] = float("-inf")
        missing = _missing(decode(ids, skip_special_tokens=True), refuse)
        if missing:
            token = self.tokenizer.encode(missing, add_special_tokens=False)[0]
            if row_scores[token] > float("-inf"):
                only = torch.full_like(row_scores, float("-inf"))
                only[token] = row_scores[token]
                return only
        return scores  # the decided words are out of the grammar's reach: keep what is left


def decision_label(refuse: bool | None) -> str | None:
    return None if refuse is None else ("refuse" if refuse else "answer")


@contextmanager
def gate_tap(model, gate: AnswerabilityGate | None) -> Iterator[LayerTap | None]:
    """A tap on the gate's layer for one `generate` call (nothing without a gate)."""
    if gate is None:
        yield None
        return
    with LayerTap(model, [gate.layer]) as tap:
        yield tap
