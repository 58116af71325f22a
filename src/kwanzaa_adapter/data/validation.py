"""Validate a JSONL data file line by line and load it as conversations.

Every problem is an `Issue(path, line, kind, message)` naming the key at fault; nothing is
silently dropped. Work on hostile input is bounded: over-long lines are not parsed, deep
nesting is rejected before `json.loads` can recurse, and only the first `max_issues` issues
are kept (the rest are counted).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import ValidationError

from kwanzaa_adapter.contract import CONTRACT_VERSION, DEFAULT_SYSTEM_PROMPT, parse_answer
from kwanzaa_adapter.data.chat_template import TemplateError, tokenize_conversation
from kwanzaa_adapter.data.records import AnswerKey, ChatExample, RagRecord, render_record

MAX_LINE_BYTES = 1 << 20
MAX_DEPTH = 64
MAX_ISSUES = 100
_BOM = b"\xef\xbb\xbf"
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")

Form = Literal["chat", "rag"]


@dataclass(frozen=True)
class Issue:
    path: str
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.message}"


class DataError(ValueError):
    """A data file (or the examples built from it) has problems; `issues` lists them."""

    def __init__(self, issues: Sequence[Issue], omitted: int = 0):
        self.issues, self.omitted = list(issues), omitted
        shown = "\n".join(f"  {issue}" for issue in self.issues[:20])
        more = len(self.issues) - 20 + omitted
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{len(self.issues) + omitted} data problem(s):\n{shown}{tail}")


@dataclass(frozen=True)
class Conversation:
    """One validated line as chat messages; RAG records are already rendered."""

    messages: list[dict[str, str]]
    meta: dict[str, Any]
    form: Form
    path: str
    line: int

    @property
    def id(self) -> str | None:
        value = self.meta.get("id")
        return None if value is None else str(value)

    @property
    def expect_refusal(self) -> bool | None:
        value = self.meta.get("expect_refusal")
        return value if isinstance(value, bool) else None


@dataclass(frozen=True)
class LengthPercentiles:
    p50: int
    p90: int
    p99: int
    max: int


@dataclass(frozen=True)
class TokenCount:
    total: int
    supervised: int


@dataclass(frozen=True)
class DatasetStatistics:
    rows: int
    forms: dict[str, int]
    labelled_rows: int  # rows that say whether they expect a refusal
    refusals: int
    token_lengths: LengthPercentiles | None
    supervised_tokens: int | None

    @property
    def refusal_share(self) -> float | None:
        return self.refusals / self.labelled_rows if self.labelled_rows else None


@dataclass(frozen=True)
class ValidationResult:
    path: str
    issues: list[Issue]
    counts: dict[str, int]  # every issue by kind, including those not listed
    omitted: int  # issues counted but not listed
    statistics: DatasetStatistics | None  # only when there is no issue

    @property
    def ok(self) -> bool:
        return not self.counts


def validate_file(path: str | Path, *, tokenizer=None, max_seq_length: int | None = None,
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT, require_answer: bool = False,
                  max_issues: int = MAX_ISSUES) -> ValidationResult:
    """Check every line of a JSONL file; with a tokenizer, also measure rendered lengths."""
    result, _ = _scan(Path(path), tokenizer, max_seq_length, system_prompt, require_answer, max_issues)
    return result


def load_examples(
    path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, *, require_answer: bool = True
) -> list[Conversation]:
    """The file's conversations; raises `DataError` listing every issue if there is any."""
    result, conversations = _scan(Path(path), None, None, system_prompt, require_answer, MAX_ISSUES)
    if not result.ok:
        raise DataError(result.issues, result.omitted)
    return conversations


class _Collector:
    def __init__(self, path: str, limit: int):
        self.path, self.limit = path, limit
        self.issues: list[Issue] = []
        self.counts: Counter[str] = Counter()

    def add(self, line: int, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.issues) < self.limit:
            self.issues.append(Issue(self.path, line, kind, message))


def _scan(path, tokenizer, max_seq_length, system_prompt, require_answer, max_issues):
    found = _Collector(str(path), max_issues)
    conversations: list[Conversation] = []
    measures: list[TokenCount] = []
    first_line_of_id: dict[str, int] = {}
    for number, raw in _read_lines(path, found):
        conversation = _check_line(raw, number, found, system_prompt, require_answer)
        if conversation is None:
            continue
        if conversation.id is not None:
            key = "id" if conversation.form == "rag" else "meta.id"
            if conversation.id in first_line_of_id:
                found.add(number, "duplicate_id", f"{key}: {conversation.id!r} already used on line "
                          f"{first_line_of_id[conversation.id]}")
                continue
            first_line_of_id[conversation.id] = number
        if tokenizer is not None:
            measure = _measure(conversation, tokenizer, found)
            if measure is None:
                continue
            if max_seq_length is not None and measure.total > max_seq_length:
                found.add(number, "too_long", f"renders to {measure.total} tokens, over max_seq_length "
                          f"{max_seq_length}; shorten the documents or raise max_seq_length")
            measures.append(measure)
        conversations.append(conversation)
    if not conversations and not found.counts:
        found.add(0, "empty_file", "the file holds no records")
    ok = not found.counts
    stats = dataset_statistics(conversations, measures if tokenizer is not None else None) if ok else None
    omitted = sum(found.counts.values()) - len(found.issues)
    result = ValidationResult(str(path), found.issues, dict(sorted(found.counts.items())), omitted, stats)
    return result, conversations


def _read_lines(path: Path, found: _Collector):
    """Yield (line number, bytes without newline); over-long lines are reported, never held whole."""
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        found.add(0, "not_a_file", "is not a regular file (a directory, FIFO or device)")
        return
    with path.open("rb") as handle:
        number = 0
        while True:
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded chunks
                    raw = handle.readline(MAX_LINE_BYTES)
                    size += len(raw)
                found.add(number, "line_too_long", f"line is {size} bytes, over the {MAX_LINE_BYTES}-byte limit")
                continue
            yield number, raw.rstrip(b"\n").rstrip(b"\r")


def _check_line(raw: bytes, number: int, found: _Collector, system_prompt: str, require_answer: bool):
    if raw.startswith(_BOM):
        found.add(number, "bom", "line starts with a UTF-8 byte-order mark; save the file as UTF-8 without BOM")
        return None
    if not raw.strip():
        found.add(number, "blank_line", "blank line; remove it (JSONL has one JSON object per line)")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        found.add(number, "invalid_utf8", f"invalid UTF-8 at byte {exc.start}")
        return None
    if _nesting_depth(text) > MAX_DEPTH:
        found.add(number, "too_deep", f"JSON nests deeper than {MAX_DEPTH} levels")
        return None
    try:
        value = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        found.add(number, "invalid_json", f"{exc.msg} at column {exc.colno}")
        return None
    except ValueError as exc:  # huge integers, NaN, duplicate keys
        found.add(number, "invalid_json", str(exc))
        return None
    if not isinstance(value, dict):
        found.add(number, "not_object", f"line is a JSON {type(value).__name__}, not an object")
        return None
    if "messages" in value:
        return _check_chat(value, number, found)
    if "question" in value or "documents" in value:
        return _check_rag(value, number, found, system_prompt, require_answer)
    found.add(number, "unknown_form", "neither chat form (has 'messages') nor RAG record form (has 'question' "
              f"and 'documents'); keys: {', '.join(sorted(value)) or 'none'}")
    return None


def _nesting_depth(text: str) -> int:
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
    return deepest


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs):
    counts = Counter(key for key, _ in pairs)
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(f"duplicate key(s) {repeated} in one object")
    return dict(pairs)


def _validated(model, value: dict, form: Form, number: int, found: _Collector):
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        for error in exc.errors():
            found.add(number, *_describe(error, form))
        return None


def _check_chat(value: dict, number: int, found: _Collector) -> Conversation | None:
    example = _validated(ChatExample, value, "chat", number, found)
    if example is None:
        return None
    conversation = Conversation([m.model_dump() for m in example.messages], dict(example.meta or {}), "chat",
                                found.path, number)
    if "expect_refusal" in conversation.meta or conversation.meta.get("task") == CONTRACT_VERSION:
        _check_chat_answer(conversation, found)
    if {"gold_documents", "key_facts"} & conversation.meta.keys():  # as a RagRecord checks its own
        for problem in AnswerKey.problems(conversation.meta):
            found.add(number, "answer_key", f"meta{problem}")
    return conversation


def _check_chat_answer(conversation: Conversation, found: _Collector) -> None:
    index = max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")
    where = f"messages[{index}].content"
    parsed = parse_answer(conversation.messages[index]["content"])
    if not parsed.ok:
        found.add(conversation.line, "answer_contract", f"{where}: not a {CONTRACT_VERSION} answer: {parsed.error}")
        return
    expected, refusal = conversation.expect_refusal, parsed.answer.is_refusal
    if expected is not None and refusal != expected:
        found.add(conversation.line, "answer_contract", f"{where}: answer {'is' if refusal else 'is not'} a refusal "
                  f"but meta.expect_refusal is {str(expected).lower()}")


def _check_rag(value: dict, number: int, found: _Collector, system_prompt: str, require_answer: bool):
    record = _validated(RagRecord, value, "rag", number, found)
    if record is None:
        return None
    if record.answer is None and require_answer:
        found.add(number, "no_assistant_turn", "answer: missing; a training record needs its gold answer")
        return None
    meta = {"id": record.id, "expect_refusal": record.expect_refusal}
    return Conversation(render_record(record, system_prompt), meta, "rag", found.path, number)


_PHRASES = {
    "missing": "missing", "extra_forbidden": "unknown key", "string_type": "must be a string",
    "bool_type": "must be true or false", "bool_parsing": "must be true or false",
    "int_type": "must be an integer", "int_parsing": "must be an integer", "int_from_float": "must be an integer",
    "float_type": "must be a number", "float_parsing": "must be a number", "list_type": "must be a list",
    "dict_type": "must be an object", "model_type": "must be an object", "string_too_short": "must not be empty",
}


def _describe(error: dict, form: Form) -> tuple[str, str]:
    """A pydantic error as (kind, 'key.path: what is wrong'), without pydantic's dump format."""
    loc, kind_of_error, ctx = error["loc"], error["type"], error.get("ctx", {})
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    if kind_of_error == "literal_error":
        choices = ctx.get("expected", "").replace("'", "").replace(" or ", ", ")
        phrase = f"must be one of {choices} (got {error['input']!r})" if "," in choices else f"must be {choices}"
    elif kind_of_error in ("greater_than_equal", "less_than_equal"):
        bound = ctx.get("ge", ctx.get("le"))
        phrase = f"must be {'>=' if kind_of_error == 'greater_than_equal' else '<='} {bound}"
    elif kind_of_error == "value_error":
        phrase = error["msg"].removeprefix("Value error, ")
    else:
        phrase = _PHRASES.get(kind_of_error, error["msg"])
    kind = _issue_kind(form, loc, kind_of_error)
    where = where or {"answer_contract": "answer", "no_assistant_turn": "messages"}.get(kind, "record")
    return kind, f"{where}: {phrase}"


def _issue_kind(form: Form, loc: tuple, kind_of_error: str) -> str:
    # The record-level rules: ChatExample's is "an assistant turn exists", RagRecord's are
    # about the gold answer agreeing with the record.
    if not loc:
        return "no_assistant_turn" if form == "chat" else "answer_contract"
    if form == "rag":
        return "answer_contract" if loc[0] == "answer" else "schema"
    if loc[-1] == "role":
        return "missing_role" if kind_of_error == "missing" else "unknown_role"
    if loc[-1] == "content" and kind_of_error in ("missing", "value_error"):
        return "empty_content"
    return "schema"


def _measure(conversation: Conversation, tokenizer, found: _Collector) -> TokenCount | None:
    try:
        example = tokenize_conversation(conversation.messages, tokenizer, None)
    except TemplateError as exc:
        found.add(conversation.line, "template", str(exc))
        return None
    return TokenCount(len(example.input_ids), example.supervised_tokens)


def dataset_statistics(
    conversations: Sequence[Conversation], measures: Sequence[TokenCount] | None = None
) -> DatasetStatistics:
    """Row, form and refusal counts; token percentiles when `measures` (one per row) are given."""
    labelled = [c.expect_refusal for c in conversations if c.expect_refusal is not None]
    lengths = sorted(m.total for m in measures) if measures else []
    percentiles = None
    if lengths:
        percentiles = LengthPercentiles(*(_nearest_rank(lengths, p) for p in (50, 90, 99)), max=lengths[-1])
    forms = dict(sorted(Counter(c.form for c in conversations).items()))
    supervised = sum(m.supervised for m in measures) if measures is not None else None
    return DatasetStatistics(len(conversations), forms, len(labelled), sum(labelled), percentiles, supervised)


def _nearest_rank(ordered: Sequence[int], percent: float) -> int:
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def format_report(result: ValidationResult) -> str:
    """What the CLI prints: each issue as `file:line: kind: message` and counts, or the statistics."""
    if not result.ok:
        lines = [str(issue) for issue in result.issues]
        if result.omitted:
            lines.append(f"... {result.omitted} more issue(s) not listed")
        total = sum(result.counts.values())
        lines.append(f"{result.path}: {total} issue(s): " + ", ".join(f"{k} {n}" for k, n in result.counts.items()))
        return "\n".join(lines)
    return f"{result.path}: ok\n" + _format_statistics(result.statistics)


def _format_statistics(stats: DatasetStatistics) -> str:
    forms = ", ".join(f"{form} {count}" for form, count in stats.forms.items()) or "none"
    share = "n/a" if stats.refusal_share is None else f"{stats.refusal_share:.1%} of {stats.labelled_rows}"
    rows = [("rows", str(stats.rows)), ("forms", forms), ("refusal share", share)]
    if stats.token_lengths is not None:
        t = stats.token_lengths
        rows.append(("tokens p50/p90/p99/max", f"{t.p50} / {t.p90} / {t.p99} / {t.max}"))
    if stats.supervised_tokens is not None:
        rows.append(("supervised tokens", str(stats.supervised_tokens)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)
