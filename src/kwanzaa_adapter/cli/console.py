"""Terminal front ends over a loaded model: `generate` and `chat`, answers rendered for people (`render_answer`) or,
with `--json`, one JSON line per answer for scripts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from kwanzaa_adapter.backend.models.causal_lm import AnswerResult, CausalLMModel, PromptTooLongError
from kwanzaa_adapter.data.records import Document
from kwanzaa_adapter.evaluation.eval_set import EvalItem, EvaluationDataError, load_eval_items

_DOCUMENTS = TypeAdapter(list[Document])


def read_records(path: str | Path, system_prompt: str) -> list[EvalItem]:
    """The RAG records (or chat lines with meta.documents) of a JSONL file, rendered for generation."""
    items = load_eval_items(path, system_prompt)
    if not items:
        raise EvaluationDataError(f"{path}: no records to answer")
    return items


def answer_records(model: CausalLMModel, items: Sequence[EvalItem], progress: bool = True,
                   constrained: bool | None = None) -> Iterator[tuple[EvalItem, AnswerResult]]:
    """Each record with its answer as the product hands it out (`CausalLMModel.finish`), in file order."""
    results = model.answer_prompts([item.prompt for item in items], progress=progress, constrained=constrained)
    for item, result in zip(items, results):
        yield item, model.finish(result, item.example.question, item.example.documents)


def load_documents(path: str | Path) -> list[Document]:
    """Documents for a chat session: a JSON list of documents, or an object with a `documents` list."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvaluationDataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise EvaluationDataError(f"{path}: not UTF-8 text") from None
    if isinstance(value, dict) and "documents" in value:
        value = value["documents"]
    try:
        return _DOCUMENTS.validate_python(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise EvaluationDataError(
            f"{path}: {where}: {first['msg']}; expected a list of documents "
            '[{"title", "text", "source"?, "year"?, "url"?}] or an object with a "documents" list'
        ) from None


class Style:
    """ANSI styles for a terminal (none when the output is not one, or NO_COLOR is set)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @classmethod
    def for_stream(cls, stream) -> "Style":
        return cls(bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR"))

    def _wrap(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.enabled else text

    def dim(self, text: str) -> str:
        return self._wrap("2", text)

    def bold(self, text: str) -> str:
        return self._wrap("1", text)

    def warn(self, text: str) -> str:
        return self._wrap("33", text)


def status_line(result: AnswerResult, seconds: float | None = None, tokens: int | None = None) -> str:
    """The quiet line under an answer: the gate's decision and probability, the answer's own completeness and
    confidence, and the time taken."""
    parts = []
    if result.gate is not None:
        parts.append(f"gate: {result.gate['decision']} (P(refuse) {result.gate['refuse_probability']:.2f})")
    if result.answer is not None:
        parts.append(f"{result.answer.answer.completeness}, confidence {result.answer.answer.confidence:.2f}")
    if seconds is not None:
        parts.append(f"{tokens} tokens in {seconds:.1f} s" if tokens is not None else f"{seconds:.1f} s")
    return " · ".join(parts)


def render_answer(result: AnswerResult, style: Style = Style(False), seconds: float | None = None,
                  tokens: int | None = None) -> str:
    """An answer for people: its text, then its sources as a numbered list (title, source, year); a refusal as
    a refusal with what is missing; an output outside the contract as such, with the output; then the status
    line. Ends with a newline."""
    lines = []
    answer = result.answer
    if answer is None:
        lines += [style.warn(f"Not a kwanzaa.answer.v1 answer: {result.error}"), _shortened(result.raw_output)]
    elif answer.is_refusal:
        lines.append(f"{style.bold('Refused:')} {answer.answer.text}")
        for missing in answer.unknowns.missing_context:
            lines.append(f"  missing: {missing}")
    else:
        lines.append(answer.answer.text)
        if answer.sources:
            lines += ["", style.bold("Sources")]
            for source in sorted(answer.sources, key=lambda s: s.citation):
                where = ", ".join(str(part) for part in (source.source, source.year) if part)
                lines.append(f"  [{source.citation}] {source.title}" + (f" ({where})" if where else "")
                             + (f" {source.url}" if source.url else ""))
        unlisted = sorted(set(answer.cited_numbers()) - {s.citation for s in answer.sources})
        if unlisted:
            lines.append(style.warn(f"  cited but not listed: {', '.join(f'[{n}]' for n in unlisted)}"))
    status = status_line(result, seconds, tokens)
    if status:
        lines.append(style.dim(status))
    return "\n".join(lines) + "\n"


def _shortened(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} characters)"


def run_chat(model: CausalLMModel, documents: Sequence[Document], read: Callable[[str], str],
             write: Callable[[str], object], max_new_tokens: int | None = None, as_json: bool = False,
             style: Style = Style(False)) -> int:
    """Question after question over the same documents; returns the count answered.

    Each question is rendered on its own, as in training (one user turn, no history), and its answer is
    finished as the product hands answers out (`CausalLMModel.finish`), then shown for people
    (`render_answer`; on a terminal a counter of the tokens runs meanwhile) or, with `as_json`, as one
    JSON line like `generate`'s. An empty line is skipped, `/quit` or end of input ends the session.
    """
    if not as_json:
        write(f"{model.name}: {len(documents)} document(s). Ask a question; /quit or Ctrl-D ends.\n")
    answered = 0
    while True:
        try:
            question = read("" if as_json else "question> ").strip()
        except EOFError:
            write("" if as_json else "\n")
            return answered
        if question in ("/quit", "/exit"):
            return answered
        if not question:
            continue
        try:
            stream = model.stream_chat(model.prompt_for(question, documents), max_new_tokens)
        except PromptTooLongError as exc:
            write(json.dumps({"question": question, "error": {"type": "context_length_exceeded",
                                                              "message": str(exc)}}) + "\n"
                  if as_json else style.warn(f"[not asked: {exc}]") + "\n")
            continue
        started = time.perf_counter()
        for count, _ in enumerate(stream, start=1):
            if style.enabled and not as_json:
                write(f"\r{style.dim(f'generating… {count} tokens')}")
        if style.enabled and not as_json:
            write("\r\x1b[2K")  # the counter's line, cleared
        seconds = time.perf_counter() - started
        result = model.finish(AnswerResult.from_output(stream.text, stream.gate_result), question, documents)
        if as_json:
            write(json.dumps({"question": question, **result.to_json()}, ensure_ascii=False) + "\n")
        else:
            write(render_answer(result, style, seconds, stream.completion_tokens) + "\n")
        answered += 1
