"""The answer_json contract `kwanzaa.answer.v1`, the system prompt that asks for it, and the parser
for a model's raw output."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

CONTRACT_VERSION = "kwanzaa.answer.v1"
CITATION_MARKER = re.compile(r"\[(\d+)\]")

# The default instruction of every rendered record (config key data.system_prompt).
DEFAULT_SYSTEM_PROMPT = (
    "Answer the question using only the numbered documents. Reply with one JSON object in the "
    "kwanzaa.answer.v1 format and cite documents as [n]. If the documents do not hold the answer, "
    "set completeness to insufficient_data and leave sources empty."
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnswerBody(_Strict):
    text: str = Field(description="The answer, with bracket markers [n] citing document n.")
    confidence: float = Field(ge=0.0, le=1.0, description="Self-assessed confidence, 0..1.")
    completeness: Literal["complete", "partial", "insufficient_data"] = Field(
        description="How fully the documents answer the question; insufficient_data is a refusal."
    )


class Source(_Strict):
    citation: int = Field(ge=1, description="Number n of the cited document [n].")
    title: str = Field(description="Title of the cited document.")
    source: str | None = Field(default=None, description="Publisher or collection, if known.")
    year: int | None = Field(default=None, description="Year of the document, if known.")
    url: str | None = Field(default=None, description="Location of the document, if any.")


class Unknowns(_Strict):
    unsupported_claims: list[str] = Field(default_factory=list, description="Claims the documents do not back.")
    missing_context: list[str] = Field(default_factory=list, description="What the documents lack.")
    clarifying_questions: list[str] = Field(default_factory=list, description="Questions for the user.")


class Answer(_Strict):
    """One answer in the `kwanzaa.answer.v1` contract."""

    version: Literal["kwanzaa.answer.v1"] = Field(description="Contract version.")
    answer: AnswerBody
    sources: list[Source] = Field(description="The documents cited in answer.text, one entry each.")
    unknowns: Unknowns

    @property
    def is_refusal(self) -> bool:
        return self.answer.completeness == "insufficient_data" and not self.sources

    def cited_numbers(self) -> list[int]:
        """Document numbers cited in answer.text, in order of first appearance."""
        return cited_numbers(self.answer.text)

    def to_json(self) -> str:
        """Compact, key-ordered JSON: the exact form the model is trained to emit."""
        return json.dumps(self.model_dump(mode="json", exclude_none=True), ensure_ascii=False, separators=(",", ":"))


def cited_numbers(text: str) -> list[int]:
    seen: dict[int, None] = {}
    for match in CITATION_MARKER.finditer(text):
        seen.setdefault(int(match.group(1)), None)
    return list(seen)


def answer_json_schema() -> dict:
    schema = Answer.model_json_schema()
    schema["$id"] = CONTRACT_VERSION
    return schema


@dataclass(frozen=True)
class ParseResult:
    """The parsed answer, or the precise reason the output is not one."""

    answer: Answer | None
    error: str | None

    @property
    def ok(self) -> bool:
        return self.answer is not None


def parse_answer(raw: str) -> ParseResult:
    """Parse a model's raw output: it must be exactly one JSON object that validates.

    Surrounding whitespace is tolerated; prose before or after the object is not.
    """
    text = raw.strip()
    if not text:
        return ParseResult(None, "empty output")
    if not text.startswith("{"):
        return ParseResult(None, f"output does not start with a JSON object: {text[:40]!r}")
    try:
        value, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        return ParseResult(None, f"invalid JSON at char {exc.pos}: {exc.msg}")
    if text[end:].strip():
        return ParseResult(None, f"text after the JSON object: {text[end:end + 40]!r}")
    try:
        return ParseResult(Answer.model_validate(value), None)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        return ParseResult(None, f"contract violation at {where}: {first['msg']}")
