"""The eval set: JSONL lines of RAG records or chat lines, read into prompts and what they are judged on.

RAG records are rendered by `render_record`, the renderer training uses, so a model is evaluated on
the format it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, parse_answer
from kwanzaa_adapter.data.records import AnswerKey, ChatExample, Document, RagRecord, question_of, render_record
from kwanzaa_adapter.evaluation.metrics import Example


class EvaluationDataError(ValueError):
    """An eval file line that cannot be evaluated; the message names file:line and the fix."""


@dataclass(frozen=True)
class EvalItem:
    """One eval example: the prompt turns to generate from and what the output is judged against."""

    id: str
    prompt: list[dict]
    example: Example
    reference: str | None = None


class _ChatMeta(AnswerKey):
    """What a chat-form line's `meta` must carry to be scored (the answer key is optional); other meta
    keys are kept, unread."""

    id: str
    expect_refusal: bool
    documents: list[Document]


def load_eval_items(
    path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_examples: int | None = None
) -> list[EvalItem]:
    """Read eval items from a JSONL of RAG records or chat lines (SPEC section 5).

    RAG records are rendered with `system_prompt`; chat lines keep their own turns, and their
    prompt is every message before the last assistant turn.
    """
    path = Path(path)
    items: list[EvalItem] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if max_examples is not None and len(items) >= max_examples:
                break
            if line.strip():
                items.append(parse_eval_line(line, f"{path}:{number}", system_prompt))
    return items


def user_turns(item: EvalItem) -> str:
    """The user turns of an item's prompt: what identifies a question over its documents."""
    return "\n".join(m["content"] for m in item.prompt if m["role"] == "user")


def eval_prompts(path: str | Path, system_prompt: str) -> set[str]:
    """The user turns of every line of an eval file, to keep an eval set out of training-side data."""
    prompts = set()
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvaluationDataError(f"{path}:{number}: not a JSON line ({exc.msg} at char {exc.pos})") from None
            if isinstance(value, dict) and "messages" in value:
                prompts.add("\n".join(m.get("content", "") for m in value["messages"]
                                      if isinstance(m, dict) and m.get("role") == "user"))
            else:
                prompts.add(user_turns(parse_eval_line(line, f"{path}:{number}", system_prompt)))
    return prompts


def parse_eval_line(line: str, where: str, system_prompt: str) -> EvalItem:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvaluationDataError(f"{where}: not a JSON line ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise EvaluationDataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    try:
        return _chat_item(value, where) if "messages" in value else _record_item(value, system_prompt)
    except ValidationError as exc:
        raise EvaluationDataError(f"{where}: {_describe(exc)}") from None


def _record_item(value: dict, system_prompt: str) -> EvalItem:
    record = RagRecord.model_validate(value)
    prompt = render_record(record.model_copy(update={"answer": None}), system_prompt)
    reference = record.answer.to_json() if record.answer is not None else None
    return EvalItem(record.id, prompt, Example.from_record(record), reference)


def _chat_item(value: dict, where: str) -> EvalItem:
    chat = ChatExample.model_validate(value)
    meta = chat.meta or {}
    if "documents" not in meta:
        raise EvaluationDataError(
            f"{where}: chat line without meta.documents; behavioral metrics need the documents: "
            "use RAG-record form or put meta.documents"
        )
    try:
        info = _ChatMeta.model_validate(meta)
    except ValidationError as exc:
        raise EvaluationDataError(f"{where}: meta: {_describe(exc)}") from None
    last_assistant = max(i for i, m in enumerate(chat.messages) if m.role == "assistant")
    prompt = [m.model_dump() for m in chat.messages[:last_assistant]]
    if not prompt:
        raise EvaluationDataError(f"{where}: nothing before the last assistant turn to prompt with")
    reference = chat.messages[last_assistant].content
    gold = parse_answer(reference).answer
    cited = gold.cited_numbers() if gold is not None and not info.expect_refusal else []
    if info.gold_documents is not None:
        cited = info.gold_documents
    example = Example(question=question_of(prompt[-1]["content"]), documents=info.documents, expect_refusal=info.expect_refusal,
                      gold=frozenset(cited), key_facts=tuple(info.key_facts) if info.key_facts is not None else None)
    return EvalItem(info.id, prompt, example, reference)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)
