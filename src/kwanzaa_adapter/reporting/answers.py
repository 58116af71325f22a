"""Answers as a person reads them: each prediction row sorted into what went wrong (or right), its text cut
into runs of words and `[n]` markers that link to the sources the answer lists."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kwanzaa_adapter.contract import CITATION_MARKER

# What went wrong, in the order the report shows them; a row that none describes is right.
KINDS = {
    "wrongly_refused": "Wrongly refused (the documents hold the answer)",
    "wrongly_answered": "Wrongly answered (the documents do not hold the answer)",
    "wrong_document": "Wrong document cited",
    "facts_missing": "Answered without the key facts",
    "contract_error": "Contract error (not a kwanzaa.answer.v1 answer)",
}
RIGHT = "right"


def verdict_kind(row: Mapping, expect_refusal: bool) -> str:
    """The kind of error of one scored row (`metrics.score_example`'s fields), or RIGHT."""
    if not row["json_valid"]:
        return "contract_error"
    if expect_refusal:
        return RIGHT if row["refused"] else "wrongly_answered"
    if row["refused"]:
        return "wrongly_refused"
    if row.get("gold_cited") is False or row.get("cited_other") or row.get("citation_ok") is False:
        return "wrong_document"
    if row.get("correct") is False:
        return "facts_missing"
    return RIGHT


def expected_refusal(row: Mapping) -> bool | None:
    """Whether the row's example should be refused, read back from its verdicts (None for a contract error)."""
    if not row["json_valid"]:
        return None
    return row["refused"] == row["refusal_correct"]


def segments(text: str, listed: Iterable[int]) -> list[tuple[str, int | None, bool]]:
    """`text` as (words, None, False) and (marker, n, listed) pieces, in order: a marker links to source n
    when the answer lists it."""
    listed = set(listed)
    pieces, at = [], 0
    for match in CITATION_MARKER.finditer(text):
        if match.start() > at:
            pieces.append((text[at:match.start()], None, False))
        number = int(match.group(1))
        pieces.append((match.group(0), number, number in listed))
        at = match.end()
    if at < len(text):
        pieces.append((text[at:], None, False))
    return pieces


@dataclass
class AnswerView:
    """One answer as the report shows it."""

    id: str
    anchor: str  # unique in the page: the sources' link targets start with it
    kind: str
    question: str | None
    documents: list[str]  # the titles the model was shown, numbered from 1
    segments: list[tuple[str, int | None, bool]] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)
    refused: bool = False
    missing: list[str] = field(default_factory=list)  # what a refusal says the documents lack
    verdicts: list[tuple[str, bool | None]] = field(default_factory=list)
    decision: str | None = None
    refuse_probability: float | None = None
    raw: str | None = None  # the output itself, where it is not a contract answer
    error: str | None = None


def answer_view(row: Mapping, example, anchor: str) -> AnswerView:
    """`row` (an eval_predictions.jsonl line) with its `example` (question, documents; None when the data file
    could not be read) as an AnswerView."""
    expect = example.expect_refusal if example is not None else expected_refusal(row)
    view = AnswerView(id=row["id"], anchor=anchor, kind=verdict_kind(row, bool(expect)),
                      question=example.question if example is not None else None,
                      documents=[d.title for d in example.documents] if example is not None else [],
                      decision=row.get("decision"), refuse_probability=row.get("refuse_probability"))
    parsed = row.get("parsed")
    if parsed is None:
        view.raw, view.error = row["output"], row.get("parse_error")
    else:
        view.sources = parsed.get("sources", [])
        view.segments = segments(parsed["answer"]["text"], [s["citation"] for s in view.sources])
        view.refused = bool(row["refused"])
        view.missing = parsed.get("unknowns", {}).get("missing_context", [])
    view.verdicts = verdict_list(row, expect)
    return view


def verdict_list(row: Mapping, expect_refusal: bool | None) -> list[tuple[str, bool | None]]:
    """The verdicts a reader checks, as (what, passed); None where it does not apply."""
    found = [("contract answer", row["json_valid"]),
             ("should refuse" if expect_refusal else "should answer", row["refusal_correct"])]
    if row.get("citation_ok") is not None:
        found.append(("citations listed", row["citation_ok"]))
    if row.get("gold_cited") is not None:
        found.append(("cites a document holding the answer", row["gold_cited"]))
    if row.get("correct") is not None:
        missing = row.get("facts_missing") or []
        found.append(("key facts stated" + (f" (missing: {', '.join(missing)})" if missing else ""), row["correct"]))
    return found


@dataclass
class AnswerGroups:
    """The answers of one run on one eval set: the wrong ones by kind, then a sample of right ones."""

    label: str
    wrong: dict[str, list[AnswerView]]
    right: list[AnswerView]
    right_total: int
    total: int


def group_answers(label: str, rows: Sequence[Mapping], examples: Mapping, prefix: str,
                  right_sample: int = 5) -> AnswerGroups:
    """`rows` of the run `label`, each joined by id to its example in `examples`, grouped by `verdict_kind`."""
    wrong: dict[str, list[AnswerView]] = {kind: [] for kind in KINDS}
    right: list[AnswerView] = []
    for number, row in enumerate(rows):
        view = answer_view(row, examples.get(row["id"]), f"{prefix}-{number}")
        (right if view.kind == RIGHT else wrong[view.kind]).append(view)
    return AnswerGroups(label, {k: v for k, v in wrong.items() if v}, right[:right_sample], len(right), len(rows))
