"""Terminal front ends over a loaded model: `generate` (one JSON line per record) and `chat`."""

from __future__ import annotations

import json
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
                   constrained: bool | None = None) -> Iterator[dict]:
    """One JSON-ready line per record, in file order: {"id", "answer" | "error"}."""
    results = model.answer_prompts([item.prompt for item in items], progress=progress, constrained=constrained)
    for item, result in zip(items, results):
        yield {"id": item.id, **model.finish(result, item.example.question, item.example.documents).to_json()}


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


def describe_result(result: AnswerResult) -> str:
    """One status line after a streamed reply: is it a contract answer, what does it cite, and what
    did the answerability gate decide."""
    gate = ""
    if result.gate is not None:
        gate = f"; gate: {result.gate['decision']} (P(refuse) {result.gate['refuse_probability']:.2f})"
    if result.answer is None:
        return f"[not a kwanzaa.answer.v1 answer: {result.error}{gate}]"
    cited = result.answer.cited_numbers()
    return (f"[kwanzaa.answer.v1: {result.answer.answer.completeness}, confidence "
            f"{result.answer.answer.confidence:.2f}, cites {cited or 'nothing'}{gate}]")


def run_chat(model: CausalLMModel, documents: Sequence[Document], read: Callable[[str], str],
             write: Callable[[str], object], max_new_tokens: int | None = None) -> int:
    """Question after question over the same documents, each answer streamed; returns the count.

    Each question is rendered on its own, as in training (one user turn, no history); an empty
    line is skipped, `/quit` or end of input ends the session.
    """
    write(f"{model.name}: {len(documents)} document(s). Ask a question; /quit or Ctrl-D ends.\n")
    answered = 0
    while True:
        try:
            question = read("question> ").strip()
        except EOFError:
            write("\n")
            return answered
        if question in ("/quit", "/exit"):
            return answered
        if not question:
            continue
        try:
            stream = model.stream_chat(model.prompt_for(question, documents), max_new_tokens)
        except PromptTooLongError as exc:
            write(f"[not asked: {exc}]\n")
            continue
        for piece in stream:
            write(piece)
        write("\n" + describe_result(AnswerResult.from_output(stream.text, stream.gate_result)) + "\n")
        answered += 1
