"""The lexical baseline: what a user gets from word overlap alone, with no model, scored like the adapter.

Two rules (../shared/CORRECTNESS.md, SPEC section 6):
- decide: refuse when the largest share of the question's content words found in one document
  (title and text) is below a threshold, the one that makes the fewest errors on the training
  records (`fit_overlap_threshold`; train only, never an eval set);
- answer: the document sentence sharing the most content words with the question (the first on
  ties), cited to its document.
Its outputs are contract answers, so `metrics.score_example` scores them as it scores a model's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kwanzaa_adapter.contract import CONTRACT_VERSION
from kwanzaa_adapter.evaluation.eval_set import EvalItem, EvaluationDataError, parse_eval_line
from kwanzaa_adapter.evaluation.metrics import DocumentLike, content_words, split_sentences

log = logging.getLogger(__name__)
LEXICAL = "lexical"
REFUSAL_TEXT = "The documents do not hold the answer to this question."


def question_overlap(question: str, documents: Sequence[DocumentLike]) -> float:
    """The largest share of the question's content words that one document (title and text) holds."""
    words = content_words(question)
    if not words:
        return 0.0
    return max((len(words & content_words(f"{doc.title} {doc.text}")) / len(words) for doc in documents), default=0.0)


def best_sentence(question: str, documents: Sequence[DocumentLike]) -> tuple[int, str] | None:
    """(document number, sentence) sharing the most content words with the question; the first on ties."""
    words = content_words(question)
    best, best_shared = None, -1
    for number, doc in enumerate(documents, start=1):
        for sentence in split_sentences(doc.text):
            shared = len(words & content_words(sentence))
            if shared > best_shared:
                best, best_shared = (number, sentence), shared
    return best


@dataclass(frozen=True)
class LexicalBaseline:
    """The two rules with the threshold fitted on the training records."""

    threshold: float
    train_accuracy: float
    train_examples: int

    def answer(self, question: str, documents: Sequence[DocumentLike]) -> str:
        """A contract answer (compact JSON), as a model would write it."""
        chosen = best_sentence(question, documents)
        if chosen is None or question_overlap(question, documents) < self.threshold:
            return _contract(REFUSAL_TEXT, "insufficient_data", [], [question])
        number, sentence = chosen
        doc = documents[number - 1]
        text = f"{sentence.rstrip('.!? ')} [{number}]."
        source = {"citation": number, "title": doc.title, **({"source": doc.source} if doc.source else {})}
        return _contract(text, "complete", [source], [])

    def outputs(self, items: Sequence[EvalItem]) -> list[str]:
        return [self.answer(item.example.question, item.example.documents) for item in items]

    def describe(self) -> dict:
        return {"threshold": round(self.threshold, 4), "train_accuracy": round(self.train_accuracy, 4),
                "train_examples": self.train_examples}


def _contract(text: str, completeness: str, sources: list[dict], missing: list[str]) -> str:
    confidence = {"complete": 0.9, "insufficient_data": 0.1}[completeness]
    answer = {"version": CONTRACT_VERSION, "answer": {"text": text, "confidence": confidence, "completeness": completeness},
              "sources": sources, "unknowns": {"unsupported_claims": [], "missing_context": missing,
                                               "clarifying_questions": []}}
    return json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


def fit_overlap_threshold(overlaps: Sequence[float], refuse: Sequence[bool]) -> tuple[float, float]:
    """(threshold, accuracy): answer at or above it, refuse below; the fewest errors, the lowest on ties."""
    if not overlaps:
        raise ValueError("no training examples to fit the overlap threshold on")
    best, best_right = 0.0, -1
    for threshold in sorted(set(overlaps)) + [float("inf")]:
        right = sum((overlap < threshold) == r for overlap, r in zip(overlaps, refuse))
        if right > best_right:
            best, best_right = threshold, right
    return best, best_right / len(overlaps)


def train_items(path: str | Path, system_prompt: str) -> list[EvalItem]:
    """The lines of a training file that can be scored (RAG records, chat lines with meta.documents and
    expect_refusal); dialogues and lines without documents are left out and counted in the log."""
    items, skipped = [], 0
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                items.append(parse_eval_line(line, f"{path}:{number}", system_prompt))
            except EvaluationDataError:
                skipped += 1
    if skipped:
        log.info("lexical baseline: %d line(s) of %s carry no documents to fit on (dialogues, plain chat); left out",
                 skipped, path)
    return items


def fit_lexical_baseline(train_file: str | Path, system_prompt: str) -> LexicalBaseline:
    """The lexical rules with their threshold fitted on the training file's records."""
    items = train_items(train_file, system_prompt)
    if not items:
        raise EvaluationDataError(f"{train_file}: no line carries documents and expect_refusal; the lexical "
                                  "baseline fits its threshold on such training records")
    overlaps = [question_overlap(item.example.question, item.example.documents) for item in items]
    threshold, accuracy = fit_overlap_threshold(overlaps, [item.example.expect_refusal for item in items])
    return LexicalBaseline(threshold, accuracy, len(items))
