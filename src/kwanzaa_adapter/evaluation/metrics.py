"""Training metrics (history, summary, perplexity) and the behavioral metrics of SPEC section 6.

Behavioral metrics have one definition: `score_example` judges one output, `aggregate` turns
verdicts into rates, and every `compute_*_rate` is `aggregate` over `score_example`. The
evaluation writes the same verdicts to eval_predictions.jsonl, so a rate can be traced to the
outputs behind it.

Choices the spec leaves open, decided here:
- refused means refused per the contract (`Answer.is_refusal`); an invalid output is not refused.
- citation_rate: an output citing a document must list it once in `sources`, and nothing else;
  repeated markers in the text are fine, repeated `sources` entries are not.
- retrieval_groundedness_rate is over the examples the model answered (valid and not a refusal,
  whatever `expect_refusal` says): an answer to an unanswerable question is scored on its claims too.
  A sentence is grounded when some `[n]` in it names a provided document whose content words
  (title and text) cover at least half of the sentence's content words (so a sentence with no
  content words, e.g. "Yes [1].", only needs a valid marker). An answer with empty text scores 0.0.

Whether an answer is *right* is scored where the eval record carries its answer key (`gold_documents`,
`key_facts`; `data.records.RagRecord`), over the answerable records:
- answer_correctness_rate: answered (valid, not refused) with every key fact stated in answer.text
  (`data.facts.states`: case, punctuation and number words normalised); a refusal or an invalid
  output is not correct.
- gold_citation_precision: cited documents that are gold over all documents cited, counted over the
  answered answerable records (each cited document once per answer).
- exact_answer_rate: correct, citing at least one gold document and none outside them.
A file without answer keys gets None (n/a) for these three.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Protocol

from kwanzaa_adapter.contract import CITATION_MARKER, Answer, parse_answer
from kwanzaa_adapter.data.facts import missing_facts
from kwanzaa_adapter.data.words import STOP_WORDS, content_words, split_sentences  # noqa: F401 (the metrics' words)
from kwanzaa_adapter.data.records import RagRecord

logger = logging.getLogger(__name__)

HISTORY_FILE = "metrics_history.jsonl"
SUMMARY_FILE = "training_summary.json"
GROUNDING_THRESHOLD = 0.5


# --------------------------------------------------------------------------- training metrics


@dataclass(frozen=True)
class TrainingMetrics:
    """One log step of training or evaluation; fields a step does not report are None."""

    step: int
    epoch: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    perplexity: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    wall_time: float | None = None

    @classmethod
    def from_dict(cls, values: Mapping) -> "TrainingMetrics":
        """Build from a log dict; keys that are not fields (e.g. Trainer's `eval_runtime`) are ignored."""
        if values.get("step") is None:
            raise ValueError(f"metrics need a 'step'; got keys {sorted(values)}")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def to_dict(self) -> dict:
        return asdict(self)


def compute_perplexity(loss: float | None) -> float | None:
    """exp(loss); inf when that overflows, None when there is no loss."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def log_training_progress(metrics: TrainingMetrics) -> str:
    """Log one readable line for a step and return it."""
    shown = {name: value for name, value in metrics.to_dict().items() if value is not None and name != "step"}
    line = f"step {metrics.step}: " + ", ".join(f"{name}={_format(value)}" for name, value in shown.items())
    logger.info(line)
    return line


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def load_history(path: str | Path) -> list[TrainingMetrics]:
    """Read a metrics_history.jsonl back; a truncated last line (a crash mid-write) is dropped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, start=1) if line.strip()]
    history = []
    for index, (number, line) in enumerate(numbered):
        try:
            history.append(TrainingMetrics.from_dict(json.loads(line)))
        except json.JSONDecodeError as exc:
            if index == len(numbered) - 1:
                logger.warning("%s:%d: dropping truncated last line (%s)", path, number, exc.msg)
                break
            raise ValueError(
                f"{path}:{number}: not a JSON line ({exc.msg}); only the last line may be truncated"
            ) from exc
    return history


class MetricsTracker:
    """Appends one JSON line per log step to `<output_dir>/metrics_history.jsonl` and summarizes.

    Each line is written and flushed on its own, so a crash loses at most the line being written.
    With `resume=True` an existing history is read back (dropping a truncated last line) and
    continued; otherwise the history file starts empty.
    """

    def __init__(self, output_dir: str | Path, resume: bool = False):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.history_path = self.output_dir / HISTORY_FILE
        self.history: list[TrainingMetrics] = []
        if resume and self.history_path.exists():
            self.history = load_history(self.history_path)
        # Rewriting also removes a truncated tail, which the next append would otherwise extend.
        self.history_path.write_text("".join(_json_line(m) for m in self.history), encoding="utf-8")

    def log_metrics(self, metrics: TrainingMetrics | Mapping) -> TrainingMetrics:
        """Record one step; perplexity is filled in from eval_loss when not given."""
        if not isinstance(metrics, TrainingMetrics):
            metrics = TrainingMetrics.from_dict(metrics)
        if metrics.perplexity is None and metrics.eval_loss is not None:
            metrics = replace(metrics, perplexity=compute_perplexity(metrics.eval_loss))
        with self.history_path.open("a", encoding="utf-8") as handle:
            handle.write(_json_line(metrics))
            handle.flush()
        self.history.append(metrics)
        return metrics

    def summary(self) -> dict:
        losses = [(m.step, m.loss) for m in self.history if m.loss is not None]
        eval_losses = [(m.step, m.eval_loss) for m in self.history if m.eval_loss is not None]
        perplexities = [m.perplexity for m in self.history if m.perplexity is not None]
        speeds = [m.tokens_per_second for m in self.history if m.tokens_per_second is not None]
        wall_times = [m.wall_time for m in self.history if m.wall_time is not None]
        best_eval = min(eval_losses, key=lambda pair: pair[1]) if eval_losses else None
        return {
            "steps": max((m.step for m in self.history), default=0),
            "log_entries": len(self.history),
            "final_loss": losses[-1][1] if losses else None,
            "best_loss": min(loss for _, loss in losses) if losses else None,
            "final_eval_loss": eval_losses[-1][1] if eval_losses else None,
            "best_eval_loss": best_eval[1] if best_eval else None,
            "best_eval_step": best_eval[0] if best_eval else None,
            "final_perplexity": perplexities[-1] if perplexities else None,
            "mean_tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
            "wall_time": wall_times[-1] if wall_times else None,
        }

    def save_summary(self, path: str | Path | None = None) -> Path:
        """Write `summary()` as JSON (default `<output_dir>/training_summary.json`); returns the path."""
        path = Path(path) if path is not None else self.output_dir / SUMMARY_FILE
        path.write_text(json.dumps(self.summary(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path


def _json_line(metrics: TrainingMetrics) -> str:
    return json.dumps(metrics.to_dict(), sort_keys=True) + "\n"


# --------------------------------------------------------------------------- behavioral metrics


class DocumentLike(Protocol):
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    """What the model was given for one generation (a `RagRecord` fits this shape too)."""

    question: str
    documents: Sequence[DocumentLike]
    expect_refusal: bool
    gold: frozenset[int] = frozenset()  # numbers of the documents that hold the answer (the gold answer's citations)
    key_facts: tuple[str, ...] | None = None  # what a right answer states; None: the record has no answer key

    @classmethod
    def from_record(cls, record: RagRecord) -> "Example":
        gold = record.answer.cited_numbers() if record.answer is not None and not record.expect_refusal else []
        if record.gold_documents is not None:
            gold = record.gold_documents
        facts = tuple(record.key_facts) if record.key_facts is not None else None
        return cls(record.question, list(record.documents), record.expect_refusal, frozenset(gold), facts)

    @property
    def graded(self) -> bool:
        """Whether the example carries an answer key for the correctness rates."""
        return self.key_facts is not None and not self.expect_refusal


ExampleLike = Example | RagRecord


def score_example(example: ExampleLike, output: str) -> dict:
    """The verdict on one raw output: everything the rates are made of, JSON-serializable.

    citation_ok is None when the example should be refused; groundedness is None unless the model
    answered (valid output, not a refusal).
    """
    parsed = parse_answer(output)
    answer = parsed.answer
    refused = answer is not None and answer.is_refusal
    should_answer = not example.expect_refusal
    gold = set(getattr(example, "gold", ()))  # a RagRecord brings none: only Example names its gold documents
    answered = answer is not None and not refused
    answered_due = answered and should_answer and bool(gold)
    return {
        "json_valid": answer is not None,
        "parse_error": parsed.error,
        "refused": refused,
        "refusal_correct": answer is not None and refused == example.expect_refusal,
        "citation_ok": _citation_ok(answer, len(example.documents)) if should_answer else None,
        "groundedness": _groundedness(answer, example.documents) if answer is not None and not refused else None,
        "cited": answer.cited_numbers() if answer is not None else [],
        # Answered where an answer was due: does it cite a document that holds the answer?
        "gold_cited": bool(set(answer.cited_numbers()) & gold) if answered_due else None,
        **_correctness(example, answer if answered else None, gold),
    }


def _correctness(example: ExampleLike, answer: Answer | None, gold: set[int]) -> dict:
    """The verdicts behind the correctness rates: None unless the example is graded; an answer that is
    missing, invalid or a refusal is not correct and cites nothing."""
    if not getattr(example, "graded", False):
        return {"facts_missing": None, "correct": None, "cited_gold": None, "cited_other": None, "exact": None}
    cited = set(answer.cited_numbers()) if answer is not None else set()
    missing = missing_facts(answer.answer.text, example.key_facts) if answer is not None else list(example.key_facts)
    correct = answer is not None and not missing
    return {"facts_missing": missing, "correct": correct,
            "cited_gold": len(cited & gold) if answer is not None else None,
            "cited_other": len(cited - gold) if answer is not None else None,
            "exact": correct and bool(cited & gold) and not cited - gold}


def _citation_ok(answer: Answer | None, document_count: int) -> bool:
    if answer is None:
        return False
    cited = answer.cited_numbers()
    listed = [source.citation for source in answer.sources]
    return (
        bool(cited)
        and all(1 <= n <= document_count for n in cited)
        and len(listed) == len(set(listed))
        and set(listed) == set(cited)
    )


def _groundedness(answer: Answer, documents: Sequence[DocumentLike]) -> float:
    sentences = split_sentences(answer.answer.text)
    if not sentences:
        return 0.0
    document_words = [content_words(f"{doc.title} {doc.text}") for doc in documents]
    grounded = sum(_sentence_grounded(sentence, document_words) for sentence in sentences)
    return grounded / len(sentences)


def _sentence_grounded(sentence: str, document_words: list[set[str]]) -> bool:
    words = content_words(sentence)
    for n in {int(marker) for marker in CITATION_MARKER.findall(sentence)}:
        if 1 <= n <= len(document_words) and len(words & document_words[n - 1]) >= GROUNDING_THRESHOLD * len(words):
            return True
    return False


def aggregate(verdicts: Sequence[Mapping]) -> dict:
    """The four rates of SPEC section 6 from `score_example` verdicts, the share of due answers that
    cite a gold document (where the examples name one) and the three correctness rates (None where no
    example is graded); None where no example applies."""
    citation = [v["citation_ok"] for v in verdicts if v["citation_ok"] is not None]
    groundedness = [v["groundedness"] for v in verdicts if v["groundedness"] is not None]
    gold = [v["gold_cited"] for v in verdicts if v.get("gold_cited") is not None]
    rates = {
        "json_validity_rate": _mean([v["json_valid"] for v in verdicts]),
        "citation_rate": _mean(citation),
        "refusal_correctness_rate": _mean([v["refusal_correct"] for v in verdicts]),
        "retrieval_groundedness_rate": _mean(groundedness),
        "gold_citation_rate": _mean(gold),
    }
    graded = [v for v in verdicts if v.get("correct") is not None]
    cited_gold = sum(v["cited_gold"] for v in graded if v["cited_gold"] is not None)
    cited = cited_gold + sum(v["cited_other"] for v in graded if v["cited_other"] is not None)
    rates["answer_correctness_rate"] = _mean([v["correct"] for v in graded])
    rates["gold_citation_precision"] = cited_gold / cited if cited else None
    rates["exact_answer_rate"] = _mean([v["exact"] for v in graded])
    return rates


def score_all(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> list[dict]:
    """`score_example` over paired examples and outputs."""
    if len(examples) != len(outputs):
        raise ValueError(f"{len(examples)} examples but {len(outputs)} outputs; pass one output per example")
    return [score_example(example, output) for example, output in zip(examples, outputs)]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_json_validity_rate(outputs: Sequence[str]) -> float | None:
    """Share of outputs that are exactly one JSON object validating against the contract."""
    # Validity does not depend on the example, so any stand-in serves.
    stand_in = Example(question="", documents=[], expect_refusal=False)
    return aggregate([score_example(stand_in, output) for output in outputs])["json_validity_rate"]


def compute_citation_rate(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["citation_rate"]


def compute_refusal_correctness_rate(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["refusal_correctness_rate"]


def compute_retrieval_groundedness_rate(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["retrieval_groundedness_rate"]


def compute_answer_correctness_rate(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["answer_correctness_rate"]


def compute_gold_citation_precision(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["gold_citation_precision"]


def compute_exact_answer_rate(examples: Sequence[ExampleLike], outputs: Sequence[str]) -> float | None:
    return aggregate(score_all(examples, outputs))["exact_answer_rate"]
