"""The two accepted line forms (chat and RAG record) and the one renderer between them.

Training, evaluation and the backend all call `render_record`, so a model is always
evaluated and served on the prompt format it was trained on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, Answer


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _not_blank(value: str, info) -> str:
    if not value.strip():
        raise ValueError(f"{info.field_name} is empty")
    return value


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str

    _blank_check = field_validator("content")(_not_blank)


class ChatExample(_Strict):
    """Chat form: a conversation with at least one assistant turn."""

    messages: list[Message] = Field(min_length=1)
    meta: dict | None = None

    @model_validator(mode="after")
    def _has_assistant(self) -> "ChatExample":
        if not any(m.role == "assistant" for m in self.messages):
            raise ValueError("no assistant turn")
        return self


class Document(_Strict):
    title: str = Field(min_length=1)
    source: str | None = None
    year: int | None = None
    url: str | None = None
    text: str = Field(min_length=1)

    _blank_check = field_validator("title", "text")(_not_blank)


class RagRecord(_Strict):
    """RAG record form: retrieved documents, a question and (for training) the gold answer."""

    id: str = Field(min_length=1)
    question: str = Field(min_length=1)
    documents: list[Document]
    expect_refusal: bool
    answer: Answer | None = None

    _blank_check = field_validator("id", "question")(_not_blank)

    @model_validator(mode="after")
    def _gold_answer_agrees(self) -> "RagRecord":
        if self.answer is None:
            return self
        if self.answer.is_refusal != self.expect_refusal:
            raise ValueError(
                f"answer {'is' if self.answer.is_refusal else 'is not'} a refusal "
                f"but expect_refusal is {self.expect_refusal}"
            )
        count = len(self.documents)
        bad = [n for n in self.answer.cited_numbers() if not 1 <= n <= count]
        if bad:
            raise ValueError(f"answer cites document(s) {bad} but only {count} are provided")
        listed = sorted(s.citation for s in self.answer.sources)
        if listed != sorted(self.answer.cited_numbers()):
            raise ValueError(f"sources list {listed} but answer.text cites {sorted(self.answer.cited_numbers())}")
        return self


def format_documents(documents: list[Document]) -> str:
    blocks = []
    for number, doc in enumerate(documents, start=1):
        about = ", ".join(str(part) for part in (doc.source, doc.year) if part)
        heading = f"[{number}] {doc.title}" + (f" ({about})" if about else "")
        link = f"\n{doc.url}" if doc.url else ""
        blocks.append(f"{heading}{link}\n{doc.text}")
    return "\n\n".join(blocks) if blocks else "(no documents)"


def render_user_turn(question: str, documents: list[Document]) -> str:
    return f"Documents:\n{format_documents(documents)}\n\nQuestion: {question}"


def render_record(record: RagRecord, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """RAG record -> chat messages; the assistant turn is present only when the gold answer is."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": render_user_turn(record.question, record.documents)},
    ]
    if record.answer is not None:
        messages.append({"role": "assistant", "content": record.answer.to_json()})
    return messages
