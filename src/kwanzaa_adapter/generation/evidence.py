"""The evidence chosen on purpose: a read-out of the adapted model's attention that picks the sentence that answers.

Every document sentence of a prompt is a candidate. Its features are what the model reads
(`generation.reading`): the attention the question's tokens pay to the sentence's tokens, one value per
block and head, on a log scale. A logistic regression, fitted on training-side records only
(`training.evidence_fitting`), turns them into P(this sentence answers the question); the best
candidate is the evidence. On the demo model this reads the answer far better than the words the
question shares with a sentence (bench/NOTES.md, "Right answers").

Where the adapter answers, the evidence is applied to its answer (`hold_to_evidence`): `cite` moves
every citation to the best sentence's document; `hold` writes the chosen sentences themselves as the
answer text, each cited to its document. A second sentence joins the best where its probability
reaches the selector's `second` threshold (fitted with it: questions that ask two things). A refusal or an output outside the contract is left as it is.

The selector is one small safetensors file in the artifact (`EVIDENCE_FILE`), sealed and signed with
the rest: weights and feature standardisation as tensors, the feature layout and its fit in the header.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kwanzaa_adapter.contract import CITATION_MARKER, Answer, Source, cited_numbers, parse_answer
from kwanzaa_adapter.data.words import split_sentences
from kwanzaa_adapter.generation.grounding import check_grounding
from kwanzaa_adapter.generation.reading import ReadPrompt, read_prompt, read_prompts
from kwanzaa_adapter.generation.readout_file import load_readout, save_readout

EVIDENCE_FILE = "evidence_selector.safetensors"
EVIDENCE_FORMAT = "kwanzaa.evidence.v1"
FEATURES = "question attention per block and head, log(mass + 1e-5)"
MODES = ("none", "cite", "hold")
_FLOOR = 1e-5


class EvidenceError(ValueError):
    """An evidence-selector file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Candidate:
    document: int  # 1-based number of the document
    index: int  # the sentence's place in its document, from 0
    sentence: str


def candidates(documents: Sequence) -> list[Candidate]:
    """Every sentence of every document, in document order."""
    return [Candidate(number, index, sentence) for number, doc in enumerate(documents, start=1)
            for index, sentence in enumerate(split_sentences(doc.text))]


def read_for_evidence(tokenizer, prompt: Sequence[dict], documents: Sequence) -> tuple[list[Candidate], ReadPrompt]:
    """A prompt's candidates and where their tokens are (`reading.read_prompt`)."""
    found = candidates(documents)
    return found, read_prompt(tokenizer, prompt, [(documents[c.document - 1].text, c.sentence) for c in found])


def as_features(attention: torch.Tensor) -> torch.Tensor:
    """The selector's features from the attention masses: their logarithm, floored."""
    return torch.log(attention + _FLOOR)


def reading_features(model, tokenizer, prompts: Sequence[Sequence[dict]], documents: Sequence[Sequence], *,
                     depth: int, batch_size: int = 4, progress=None) -> list[tuple[list[Candidate], torch.Tensor]]:
    """Per prompt: its candidates and their features (candidates x depth*heads), from one forward pass each that
    stops after block `depth`."""
    read = [read_for_evidence(tokenizer, prompt, docs) for prompt, docs in zip(prompts, documents)]
    reading = read_prompts(model, tokenizer, [r for _, r in read], depth=depth, batch_size=batch_size,
                           progress=progress)
    return [(found, as_features(attention)) for (found, _), attention in zip(read, reading.attention)]


@dataclass(frozen=True)
class Evidence:
    """The chosen sentences (the best, and the runner-up where it scores at least the selector's `second`),
    in document order, with their probabilities."""

    chosen: tuple[Candidate, ...]
    probabilities: tuple[float, ...]

    @property
    def best(self) -> Candidate:
        return self.chosen[max(range(len(self.chosen)), key=lambda i: self.probabilities[i])]


@dataclass(frozen=True)
class EvidenceSelector:
    """P(answers) = sigmoid(((x - mean) / scale) . weight + bias) over `reading_features`; the best candidate wins."""

    depth: int  # the blocks it reads, 1..depth
    second: float  # the runner-up joins the best when its probability is at least this (above 1: never)
    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    info: dict = field(default_factory=dict)  # how it was fitted: records, cross-fitted top-1 accuracy

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[1] != self.weight.shape[0]:
            raise EvidenceError(f"the selector reads {self.weight.shape[0]} attention values per sentence but "
                                f"this model gives {features.shape[1]}: it was fitted on another model")
        return torch.sigmoid(((features.float() - self.mean) / self.scale) @ self.weight + self.bias)

    def choose(self, found: Sequence[Candidate], features: torch.Tensor) -> Evidence | None:
        """The best-scored candidate (the first on ties) and the runner-up where it reaches `second`; None
        when there is no candidate."""
        if not found:
            return None
        scores = self.probabilities(features)
        order = sorted(range(len(found)), key=lambda i: (-float(scores[i]), i))
        picked = sorted(order[:1] + [i for i in order[1:2] if float(scores[i]) >= self.second])
        return Evidence(tuple(found[i] for i in picked), tuple(round(float(scores[i]), 4) for i in picked))

    def select(self, model, tokenizer, prompts: Sequence[Sequence[dict]], documents: Sequence[Sequence],
               progress=None) -> list[Evidence | None]:
        """The evidence of each prompt over its documents (one reference forward pass per prompt)."""
        return [self.choose(found, features) for found, features in
                reading_features(model, tokenizer, prompts, documents, depth=self.depth, progress=progress)]

    def describe(self) -> dict:
        return {"features": FEATURES, "blocks": self.depth, "width": int(self.weight.shape[0]),
                "second_threshold": round(self.second, 4), **self.info}

    def save(self, path: str | Path) -> Path:
        return save_readout(path, {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale},
                            {"format": EVIDENCE_FORMAT, "features": FEATURES, "depth": str(self.depth),
                             "second": repr(float(self.second)), "info": json.dumps(self.info, sort_keys=True)})


def load_evidence_selector(artifact: str | Path, digests: Mapping[str, str] | None = None) -> EvidenceSelector | None:
    """The selector of an artifact directory (verified by the caller; with `digests`, built only from the verified
    bytes), or None when it has none."""
    selector = load_readout(artifact, EVIDENCE_FILE, digests, EvidenceError, "an evidence-selector",
                            {"format": EVIDENCE_FORMAT, "features": FEATURES},
                            lambda header, t: EvidenceSelector(int(header["depth"]), float(header["second"]),
                                                               t["weight"], t["bias"], t["mean"], t["scale"],
                                                               json.loads(header.get("info", "{}"))))
    if selector is not None and (selector.depth < 1 or selector.weight.shape[0] % selector.depth):
        raise EvidenceError(f"{Path(artifact) / EVIDENCE_FILE}: {selector.weight.shape[0]} weights are not the heads "
                            f"of {selector.depth} blocks")
    return selector


def answered(output: str) -> bool:
    """Whether an output is a contract answer that is not a refusal: the only kind the evidence acts on."""
    answer = parse_answer(output).answer
    return answer is not None and not answer.is_refusal


def hold_to_evidence(output: str, documents: Sequence, evidence: Evidence | None, mode: str) -> str:
    """The output with its evidence applied (`mode` of `MODES`); a refusal or an invalid output is returned as is."""
    answer = parse_answer(output).answer
    if mode == "none" or evidence is None or answer is None or answer.is_refusal:
        return output
    if mode == "hold":
        text = " ".join(f"{c.sentence.rstrip('.!? ')} [{c.document}]." for c in evidence.chosen)
    else:
        number = evidence.best.document
        text = CITATION_MARKER.sub(f"[{number}]", answer.answer.text)
        text = text if CITATION_MARKER.search(text) else f"{text.rstrip().rstrip('.')} [{number}]."
    sources = [Source(citation=n, title=documents[n - 1].title, source=documents[n - 1].source,
                      year=documents[n - 1].year, url=documents[n - 1].url) for n in cited_numbers(text)]
    held = answer.model_copy(update={"answer": answer.answer.model_copy(update={"text": text}), "sources": sources})
    return Answer.model_validate(held.model_dump()).to_json()


def finish_answer(output: str, documents: Sequence, *, evidence: Evidence | None = None, mode: str = "none",
                  grounding: bool = False) -> str:
    """An answer as the product hands it out: its `evidence` applied (`hold_to_evidence`), then the grounding
    check (`grounding.check_grounding`); mode none and no check leave the output as it was."""
    output = hold_to_evidence(output, documents, evidence, mode)
    return check_grounding(output, documents) if grounding else output
