"""The two accepted line forms (chat and RAG record) and the one renderer between them.

Training, evaluation and the backend all call `render_record`, so a model is always
evaluated and served on the prompt format it was trained on.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, Answer
from kwanzaa_adapter.data.facts import states


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
    # What a right answer is (evaluation only): the documents that hold it, and the facts it must state.
    gold_documents: list[int] | None = Field(default=None, description="Numbers n of the documents that hold the answer.")
    key_facts: list[str] | None = Field(default=None, description="Short strings a right answer must state.")

    _blank_check = field_validator("id", "question")(_not_blank)

    @model_validator(mode="after")
    def _gold_answer_agrees(self) -> "RagRecord":
        problem = answer_key_problem(self.gold_documents, self.key_facts, self.documents, self.expect_refusal)
        if problem:
            raise ValueError(problem)
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
        outside = sorted(set(self.answer.cited_numbers()) - set(self.gold_documents or self.answer.cited_numbers()))
        if outside:
            raise ValueError(f"answer cites document(s) {outside} outside gold_documents {self.gold_documents}")
        return self


class AnswerKey(BaseModel):
    """A chat line's `meta` as far as its answer key goes (as a `RagRecord` carries it); other keys are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)

    expect_refusal: bool = False
    documents: list[Document] = Field(default_factory=list)
    gold_documents: list[int] | None = None
    key_facts: list[str] | None = None

    @classmethod
    def problems(cls, meta: dict) -> list[str]:
        """What is wrong with `meta`'s answer key, each as '.key.path: message' ('': the key as a whole)."""
        try:
            cls.model_validate(meta)
        except ValidationError as exc:
            return ["".join(f".{part}" for part in error["loc"]) + ": " + error["msg"].removeprefix("Value error, ")
                    for error in exc.errors()]
        return []

    @model_validator(mode="after")
    def _key_agrees(self) -> "AnswerKey":
        problem = answer_key_problem(self.gold_documents, self.key_facts, self.documents, self.expect_refusal)
        if problem:
            raise ValueError(problem)
        return self


def answer_key_problem(gold_documents: list[int] | None, key_facts: list[str] | None, documents: list,
                       expect_refusal: bool) -> str | None:
    """What is wrong with a record's answer key (gold documents and key facts), or None.

    An answerable record's key facts need gold documents, and each fact must be stated by one of them:
    a fact no gold document states cannot be asked of an answer that is held to the documents."""
    if gold_documents is None and key_facts is None:
        return None
    if expect_refusal:
        return "gold_documents and key_facts belong to answerable records; this one expects a refusal"
    if not gold_documents:
        return "an answer key needs gold_documents: the numbers of the documents that hold the answer"
    bad = [n for n in gold_documents if not 1 <= n <= len(documents)]
    if bad:
        return f"gold_documents {bad} outside the {len(documents)} documents provided"
    if len(set(gold_documents)) != len(gold_documents):
        return f"gold_documents repeats a document: {gold_documents}"
    for fact in key_facts or []:
        if not fact.strip():
            return "key_facts holds an empty fact"
        if not any(states(documents[n - 1].text, fact) for n in gold_documents):
            return f"key fact {fact!r} is stated by none of the gold documents {sorted(gold_documents)}"
    return None


def format_documents(documents: list[Document]) -> str:
    blocks = []
    for number, doc in enumerate(documents, start=1):
        about = ", ".join(str(part) for part in (doc.source, doc.year) if part)
        heading = f"[{number}] {doc.title}" + (f" ({about})" if about else "")
        link = f"\n{doc.url}" if doc.url else ""
        blocks.append(f"{heading}{link}\n{doc.text}")
    return "\n\n".join(blocks) if blocks else "(no documents)"


QUESTION_LABEL = "Question: "


def render_user_turn(question: str, documents: list[Document]) -> str:
    return f"Documents:\n{format_documents(documents)}\n\n{QUESTION_LABEL}{question}"


def question_of(user_turn: str) -> str:
    """The question of a user turn that `render_user_turn` wrote (else the whole turn)."""
    _, label, question = user_turn.rpartition(QUESTION_LABEL)
    return question if label else user_turn


def render_record(record: RagRecord, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """RAG record -> chat messages; the assistant turn is present only when the gold answer is."""
    messages = [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": render_user_turn(record.question, record.documents)},
    ]
    if record.answer is not None:
        messages.append({"role": "assistant", "content": record.answer.to_json()})
    return messages
