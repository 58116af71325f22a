"""The authored sources under data/source/: their schema, the loaders, and which documents may be distractors.

Shared by build_dataset.py and decisions.py, which import it with data/ on sys.path.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kwanzaa_adapter.data.records import Document

SOURCE_DIR = Path(__file__).resolve().parent / "source"
# Source files: the train and eval splits share one pair; the heldout and paraphrase sets have their own.
SOURCE_FILES = {"documents.jsonl": "questions.jsonl", "heldout_documents.jsonl": "heldout_questions.jsonl",
                "paraphrase_documents.jsonl": "paraphrase_questions.jsonl"}
# The split each file pair may hold (None: any split but those that have their own pair).
PAIR_SPLIT = {"documents.jsonl": None, "heldout_documents.jsonl": "heldout", "paraphrase_documents.jsonl": "paraphrase"}
NEAR_MISS_SOURCE = "near_miss.jsonl"
# Citation placeholders in a question's answer_text; the build turns them into [n] markers.
PLACEHOLDER = re.compile(r"\{d:([a-z0-9_]+)\}")

Split = Literal["train", "eval", "heldout", "paraphrase"]
# Eval-only splits whose answerable questions must say what a right answer states (`key_facts`).
GRADED_SPLITS = ("eval", "heldout", "paraphrase")
# Why the documents shown cannot answer: a nearby detail of the right subject is missing; the
# documents are about other subjects; a document mentions the subject but not the asked fact.
RefusalKind = Literal["nearby_detail", "off_topic", "mentions_subject"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceDocument(_Strict):
    """One line of data/source/documents.jsonl."""

    doc_id: str = Field(pattern=r"^[a-z0-9_]+$", description="Stable id used by questions.")
    split: Split = Field(description="The only split whose records may show this document.")
    topic: str = Field(min_length=1, description="Distractors never share a topic with a relevant document.")
    title: str = Field(min_length=1)
    source: str = Field(min_length=1, description="A generic label for the kind of note, never a real publication.")
    year: int | None = Field(default=None, ge=1990, le=2024, description="The note's own date, not a historical claim.")
    url: str | None = Field(default=None, pattern=r"^https://example\.(org|com)/[a-z0-9/_-]+$",
                            description="Only on the reserved example domains.")
    text: str = Field(min_length=1)

    def as_document(self) -> Document:
        return Document(title=self.title, source=self.source, year=self.year, url=self.url, text=self.text)


class SourceQuestion(_Strict):
    """One line of data/source/questions.jsonl."""

    id: str = Field(min_length=1)
    split: Split
    question: str = Field(min_length=1)
    doc_ids: list[str] = Field(max_length=2, description="Relevant documents; for an off-topic refusal, the "
                               "documents on the subject, whose topics are kept out of the record.")
    answer_text: str = Field(min_length=1, description="Gold answer.text with {d:<doc_id>} citation placeholders.")
    key_facts: list[str] = Field(default_factory=list, description="Short strings a right answer must state, each "
                                 "stated by a document of doc_ids; required on answerable eval-only questions.")
    completeness: Literal["complete", "partial", "insufficient_data"]
    missing_context: list[str] = Field(default_factory=list, description="What the documents lack.")
    refusal: RefusalKind | None = Field(default=None, description="The kind of refusal; only on refusals.")

    @property
    def is_refusal(self) -> bool:
        return self.completeness == "insufficient_data"

    @property
    def shown_doc_ids(self) -> list[str]:
        """The documents every record of this question shows (none for an off-topic refusal)."""
        return [] if self.refusal == "off_topic" else self.doc_ids

    @model_validator(mode="after")
    def _refusal_kind_agrees(self) -> "SourceQuestion":
        if self.is_refusal != (self.refusal is not None):
            raise ValueError(f"question {self.id!r}: `refusal` (the kind) is required on refusals and only there")
        if not self.doc_ids and self.refusal != "off_topic":
            raise ValueError(f"question {self.id!r}: only an off-topic refusal may have no doc_ids")
        if self.is_refusal and self.key_facts:
            raise ValueError(f"question {self.id!r}: a refusal states no key facts")
        if not self.is_refusal and self.split in GRADED_SPLITS and not self.key_facts:
            raise ValueError(f"question {self.id!r}: an answerable {self.split} question needs key_facts")
        return self


class NearMiss(_Strict):
    """One line of data/source/near_miss.jsonl: a train question whose one relevant document is
    swapped for a same-topic document that does not state the asked fact (checked by reading)."""

    question_id: str = Field(min_length=1)
    replacement_doc_id: str = Field(min_length=1)
    answer_text: str = Field(min_length=1, description="The refusal, without citations.")
    missing_context: list[str] = Field(min_length=1, max_length=1)


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_sources(source_dir: Path = SOURCE_DIR) -> tuple[dict[str, SourceDocument], list[SourceQuestion]]:
    """All documents (by id) and questions; ids are unique across files, and the heldout set keeps
    to its own pair of files."""
    documents: dict[str, SourceDocument] = {}
    questions: list[SourceQuestion] = []
    own_pairs = {split: name for name, split in PAIR_SPLIT.items() if split}
    for documents_file, questions_file in SOURCE_FILES.items():
        for number, row in enumerate(read_jsonl(source_dir / documents_file), start=1):
            doc = _validated(SourceDocument, row, documents_file, number)
            if doc.doc_id in documents:
                raise ValueError(f"{documents_file}:{number}: duplicate doc_id {doc.doc_id!r}")
            if own_pairs.get(doc.split, "documents.jsonl") != documents_file:
                raise ValueError(f"{documents_file}:{number}: document {doc.doc_id!r} of split {doc.split!r} belongs "
                                 f"in {own_pairs.get(doc.split, 'documents.jsonl')}")
            documents[doc.doc_id] = doc
        for number, row in enumerate(read_jsonl(source_dir / questions_file), start=1):
            question = _validated(SourceQuestion, row, questions_file, number)
            if own_pairs.get(question.split, "documents.jsonl") != documents_file:
                raise ValueError(f"{questions_file}:{number}: question {question.id!r} of split {question.split!r} "
                                 "is in the wrong file")
            questions.append(question)
    seen: set[str] = set()
    for question in questions:
        if question.id in seen:
            raise ValueError(f"duplicate question id {question.id!r}")
        seen.add(question.id)
    return documents, questions


def _validated(model, row: dict, name: str, number: int):
    try:
        return model.model_validate(row)
    except ValidationError as exc:
        raise ValueError(f"{name}:{number}: {exc}") from None


def load_near_misses(source_dir: Path = SOURCE_DIR) -> list[NearMiss]:
    return [NearMiss.model_validate(row) for row in read_jsonl(source_dir / NEAR_MISS_SOURCE)]


def distractors(question: SourceQuestion, documents: dict[str, SourceDocument]) -> list[SourceDocument]:
    """Documents of the question's split whose topic is no topic of its doc_ids, so none can hold the
    answer (for an off-topic refusal, none is about its subject); sorted by doc_id."""
    excluded_topics = {documents[doc_id].topic for doc_id in question.doc_ids}
    return sorted((d for d in documents.values() if d.split == question.split and d.topic not in excluded_topics),
                  key=lambda d: d.doc_id)
