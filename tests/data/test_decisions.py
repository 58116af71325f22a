"""The decision examples for the answerability gate: labelled by the gold documents, never an eval or
training prompt, ids the cross-fitting can group by."""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, load_script
from kwanzaa_adapter.data.records import Document, RagRecord, render_user_turn
from kwanzaa_adapter.evaluation.eval_set import load_eval_items

DATA_DIR = ROOT / "data"
build_dataset = load_script(DATA_DIR / "build_dataset.py", "build_dataset")
decisions = sys.modules["decisions"]  # imported by build_dataset, which puts data/ on sys.path
KINDS = ("answerable", "same_topic", "off_topic", "refusal")
ID = re.compile(r"^(?P<question>.+)\.gate\.(?P<kind>[a-z_]+)\.(?P<n>[0-9])$")
# Every prompt the adapter is evaluated or trained on, in records and chat forms.
OTHER_FILES = ("kwanzaa_eval.jsonl", "kwanzaa_eval_records.jsonl", "kwanzaa_heldout.jsonl",
               "kwanzaa_heldout_records.jsonl", "kwanzaa_train.jsonl", "kwanzaa_train_records.jsonl",
               build_dataset.MIX_FILE, build_dataset.NEAR_MISS_FILE)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _key(doc) -> tuple[str, str]:
    return doc.title, doc.text


@pytest.fixture(scope="module")
def lines() -> list[dict]:
    return _read_jsonl(DATA_DIR / decisions.DECISIONS_FILE)


@pytest.fixture(scope="module")
def examples(lines) -> list[RagRecord]:
    return [RagRecord.model_validate(line) for line in lines]


@pytest.fixture(scope="module")
def sources():
    documents, questions = build_dataset.load_sources()
    return documents, {q.id: q for q in questions}


def test_lines_are_records_the_eval_loader_reads_with_a_gold_answer_on_answerable_ones_only(lines, examples):
    for line in lines:
        answerable = not line["expect_refusal"]
        assert list(line) == ["id", "question", "documents", "expect_refusal", *(["answer"] if answerable else [])]
    items = load_eval_items(DATA_DIR / decisions.DECISIONS_FILE)
    assert [item.id for item in items] == [e.id for e in examples]
    for item, example in zip(items, examples):
        assert (item.reference is None) == example.expect_refusal
        assert item.example.expect_refusal == example.expect_refusal
        assert [m["role"] for m in item.prompt] == ["system", "user"]
        assert item.prompt[1]["content"] == render_user_turn(example.question, example.documents)


def test_label_is_whether_every_gold_document_is_shown(examples, sources):
    documents, questions = sources
    train = {_key(d) for d in documents.values() if d.split == "train"}
    topic = {_key(d): d.topic for d in documents.values()}
    for example in examples:
        match = ID.match(example.id)
        question = questions[match["question"]]
        kind = match["kind"]
        gold = {_key(documents[doc_id]) for doc_id in question.doc_ids}
        shown = [_key(d) for d in example.documents]
        assert question.split == "train" and set(shown) <= train, example.id
        assert example.question == question.question and 1 <= len(shown) == len(set(shown)) <= 5, example.id
        assert example.expect_refusal == (kind != "answerable"), example.id
        assert question.is_refusal == (kind == "refusal"), example.id
        if kind == "answerable":
            assert gold <= set(shown), f"{example.id}: a gold document is missing"
            cited = {shown[n - 1] for n in example.answer.cited_numbers()}  # the answer cites the gold documents
            assert cited == gold, example.id
        elif kind == "refusal":
            kept = {_key(documents[doc_id]) for doc_id in question.shown_doc_ids}
            assert kept <= set(shown) and 1 <= len(shown) - len(kept) <= 3, example.id
        else:
            assert not gold & set(shown), f"{example.id}: shows a gold document"
            near = [key for key in shown if topic[key] in {topic[g] for g in gold}]
            assert (kind == "same_topic") == bool(near), f"{example.id}: {len(near)} documents of the gold topic"
            assert len(near) <= 2, example.id


def _user_turns(path: Path) -> set[str]:
    turns = set()
    for row in _read_jsonl(path):
        if "messages" in row:
            turns |= {m["content"] for m in row["messages"] if m["role"] == "user"}
        else:
            turns.add(render_user_turn(row["question"], [Document.model_validate(d) for d in row["documents"]]))
    return turns


def test_no_prompt_is_an_eval_heldout_or_training_prompt(examples):
    prompts = [render_user_turn(e.question, e.documents) for e in examples]
    assert len(set(prompts)) == len(prompts), "two decision examples share a prompt"
    for name in OTHER_FILES:
        turns = _user_turns(DATA_DIR / name)
        assert turns, name
        shared = [e.id for e, prompt in zip(examples, prompts) if prompt in turns]
        assert not shared, f"{name} holds the prompt of {shared[:5]}"


def test_build_stops_on_an_example_that_repeats_an_eval_prompt():
    content = (DATA_DIR / "kwanzaa_eval_records.jsonl").read_text(encoding="utf-8")
    record = RagRecord.model_validate(json.loads(content.splitlines()[0]))
    leaked = record.model_copy(update={"id": "leak.gate.refusal.0", "answer": None})
    prompts = {"kwanzaa_eval_records.jsonl": decisions.user_turns(content)}
    with pytest.raises(ValueError, match=r"'leak\.gate\.refusal\.0'.*kwanzaa_eval_records\.jsonl"):
        decisions.check_decisions([leaked], prompts)
    other = leaked.model_copy(update={"question": "Something else?"})
    with pytest.raises(ValueError, match=r"'leak\.gate\.refusal\.0'.*not unique"):
        decisions.check_decisions([other, other], prompts)


def test_ids_follow_the_scheme_and_every_train_question_is_covered(examples, sources):
    _, questions = sources
    ids = [e.id for e in examples]
    assert len(set(ids)) == len(ids)
    matches = [ID.match(example_id) for example_id in ids]
    assert all(matches), [i for i, m in zip(ids, matches) if m is None][:5]
    kinds = Counter(m["kind"] for m in matches)
    assert set(kinds) == set(KINDS), kinds
    train = [q for q in questions.values() if q.split == "train"]
    per_question = Counter(m["question"] for m in matches)
    assert per_question == Counter({q.id: 1 if q.is_refusal else 3 for q in train})
    assert kinds["answerable"] == 2 * sum(not q.is_refusal for q in train)
    assert kinds["refusal"] == sum(q.is_refusal for q in train)
    assert min(kinds["same_topic"], kinds["off_topic"]) >= 0.3 * (kinds["same_topic"] + kinds["off_topic"])
    assert all(m["n"] == "0" or (m["kind"], m["n"]) == ("answerable", "1") for m in matches), "numbered per kind"
    share = sum(e.expect_refusal for e in examples) / len(examples)
    assert 0.35 <= share <= 0.5, share


def _doc(doc_id: str, topic: str, text: str):
    return build_dataset.SourceDocument(doc_id=doc_id, split="train", topic=topic, title=doc_id.title(),
                                        source="test note", text=text)


def test_a_same_topic_document_that_states_the_gold_answer_is_not_eligible():
    documents = {d.doc_id: d for d in (
        _doc("origin", "origins", "Kwanzaa was created by Maulana Karenga in 1966. It lasts seven days."),
        _doc("restates", "origins", "Families gather each winter. The holiday was created by Maulana Karenga."),
        _doc("half", "origins", "Maulana Karenga taught at a university in California for many years."),
        _doc("elsewhere", "sports", "Jesse Owens won four gold medals at the 1936 Olympics in Berlin."),
    )}
    question = build_dataset.SourceQuestion(
        id="origins.q1", split="train", question="Who created Kwanzaa?", doc_ids=["origin"],
        answer_text="Kwanzaa was created by Maulana Karenga {d:origin}.", completeness="complete")
    # Answer words: kwanzaa, created, maulana, karenga. "restates" holds 3 of 4 in one sentence; "half" 2 of 4.
    assert decisions.states_answer(documents["restates"], question.answer_text)
    assert not decisions.states_answer(documents["half"], question.answer_text)
    assert [d.doc_id for d in decisions.same_topic_documents(question, documents)] == ["half"]
    assert decisions.planned_kinds([question], documents, 1)[question.id] == ["answerable", "answerable",
                                                                             "same_topic"]
    del documents["half"]
    assert decisions.planned_kinds([question], documents, 1)[question.id] == ["answerable", "answerable",
                                                                             "off_topic"]


def test_a_document_that_states_one_sentence_of_a_two_document_answer_is_not_eligible():
    answer_text = ("Kwanzaa was created by Maulana Karenga {d:origin}. "
                   "It runs from December 26 to January 1 {d:dates}.")
    # "restates" holds 3 of the whole answer's 7 content words, but 3 of its first sentence's 4.
    assert decisions.states_answer(_doc("restates", "origins", "Maulana Karenga created it."), answer_text)
    assert not decisions.states_answer(_doc("half", "origins", "Maulana Karenga taught in California."),
                                       answer_text)


def test_build_writes_the_decisions_file_and_check_covers_it(tmp_path):
    outputs = build_dataset.build_outputs()
    assert decisions.DECISIONS_FILE in outputs
    assert build_dataset.stale_files({decisions.DECISIONS_FILE: outputs[decisions.DECISIONS_FILE]}) == []
    build_dataset.write_outputs(outputs, tmp_path)
    path = tmp_path / decisions.DECISIONS_FILE
    path.write_text(path.read_text(encoding="utf-8").replace('"expect_refusal": true', '"expect_refusal": false', 1),
                    encoding="utf-8")
    assert build_dataset.stale_files(outputs, tmp_path) == [decisions.DECISIONS_FILE]
