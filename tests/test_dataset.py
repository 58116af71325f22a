"""The shipped dataset under data/: contract-valid, leak-free, balanced, grounded and reproducible."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kwanzaa_adapter.answer import CITATION_MARKER, parse_answer
from kwanzaa_adapter.data.records import ChatExample, RagRecord, render_record
from kwanzaa_adapter.metrics import GROUNDING_THRESHOLD, content_words, score_example, split_sentences

from conftest import load_script

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
SPLITS = ("train", "eval")
SOURCE_LABEL = "kwanzaa-adapter reference notes"
build_dataset = load_script(DATA_DIR / "build_dataset.py", "build_dataset")


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def records() -> dict[str, list[RagRecord]]:
    return {
        split: [RagRecord.model_validate(row) for row in _read_jsonl(DATA_DIR / f"kwanzaa_{split}_records.jsonl")]
        for split in SPLITS
    }


@pytest.fixture(scope="module")
def source_documents() -> list[dict]:
    return _read_jsonl(DATA_DIR / "source" / "documents.jsonl")


def test_every_gold_answer_validates_against_contract_and_record_model(records):
    for split in SPLITS:
        chat_lines = _read_jsonl(DATA_DIR / f"kwanzaa_{split}.jsonl")
        assert [line["meta"]["id"] for line in chat_lines] == [r.id for r in records[split]]
        for record, line in zip(records[split], chat_lines):
            assert record.answer is not None, record.id
            parsed = parse_answer(record.answer.to_json())
            assert parsed.ok, f"{record.id}: {parsed.error}"
            assert parsed.answer == record.answer
            ChatExample.model_validate(line)
            assert line["messages"] == render_record(record)
            documents = [d.model_dump(mode="json", exclude_none=True) for d in record.documents]
            assert line["meta"] == {"id": record.id, "expect_refusal": record.expect_refusal, "split": split,
                                    "documents": documents}


def test_refusals_are_empty_and_name_what_is_missing(records):
    for record in records["train"] + records["eval"]:
        answer = record.answer
        if record.expect_refusal:
            assert answer.answer.completeness == "insufficient_data" and not answer.sources, record.id
            assert not answer.cited_numbers(), record.id
            assert len(answer.unknowns.missing_context) == 1, record.id
        else:
            assert answer.answer.confidence >= 0.5 and answer.sources, record.id
            assert [s.citation for s in answer.sources] == answer.cited_numbers(), record.id
            for source in answer.sources:
                cited = record.documents[source.citation - 1]
                assert (source.title, source.source) == (cited.title, cited.source), record.id


def test_no_eval_question_or_document_appears_in_train(records):
    train_questions = {r.question.strip().lower() for r in records["train"]}
    train_titles = {d.title for r in records["train"] for d in r.documents}
    train_texts = {d.text for r in records["train"] for d in r.documents}
    train_blob = "\n".join(train_texts | train_titles | train_questions)
    for record in records["eval"]:
        assert record.question.strip().lower() not in train_questions, record.id
        for doc in record.documents:
            assert doc.title not in train_titles, f"{record.id}: eval document {doc.title!r} is in train"
            assert doc.text not in train_blob, f"{record.id}: text of {doc.title!r} is in train"


def test_source_documents_are_split_disjoint_and_follow_the_datasheet(source_documents, records):
    assert len({d["doc_id"] for d in source_documents}) == len(source_documents)
    assert len({d["title"] for d in source_documents}) == len(source_documents)
    for doc in source_documents:
        assert set(doc) == {"doc_id", "split", "topic", "title", "source", "text"}, doc["doc_id"]
        assert doc["source"] == SOURCE_LABEL, doc["doc_id"]
        assert 45 <= len(doc["text"].split()) <= 80, doc["doc_id"]
    for split in SPLITS:
        allowed = {d["title"] for d in source_documents if d["split"] == split}
        shown = {d.title for r in records[split] for d in r.documents}
        assert shown <= allowed, f"{split} records show documents of the other split: {shown - allowed}"


def test_split_sizes_and_refusal_share(records):
    assert len(records["train"]) >= 160
    assert len(records["eval"]) >= 40
    for split in SPLITS:
        share = sum(r.expect_refusal for r in records[split]) / len(records[split])
        assert 0.2 <= share <= 0.3, f"{split} refusal share {share:.2f}"
        assert all(len(r.documents) == 3 for r in records[split])
        two_doc = sum(len(r.answer.sources) == 2 for r in records[split])
        assert two_doc >= 5, f"{split} has only {two_doc} records citing two documents"


def test_relevant_documents_appear_in_every_position(records):
    for split in SPLITS:
        positions = Counter(n for r in records[split] for n in r.answer.cited_numbers())
        assert set(positions) == {1, 2, 3}
        assert min(positions.values()) >= 0.2 * sum(positions.values()), f"{split}: {positions}"


def test_answer_sentences_are_grounded_in_a_cited_document(records):
    """Stricter than the metric: every sentence has content words and a marker, and text alone counts."""
    for record in records["train"] + records["eval"]:
        if record.expect_refusal:
            continue
        for sentence in split_sentences(record.answer.answer.text):
            words = content_words(sentence)
            cited = [int(n) for n in CITATION_MARKER.findall(sentence)]
            assert cited, f"{record.id}: sentence without a citation: {sentence!r}"
            assert words, f"{record.id}: sentence without content words: {sentence!r}"
            best = max(len(words & content_words(record.documents[n - 1].text)) / len(words) for n in cited)
            assert best >= GROUNDING_THRESHOLD, f"{record.id}: {sentence!r} shares only {best:.0%} with its source"


def test_gold_answers_score_perfectly_on_the_behavioral_metrics(records):
    for record in records["train"] + records["eval"]:
        verdict = score_example(record, record.answer.to_json())
        assert verdict["json_valid"] and verdict["refusal_correct"], record.id
        if record.expect_refusal:
            assert verdict["groundedness"] is None, record.id
        else:
            assert verdict["citation_ok"] and verdict["groundedness"] == 1.0, record.id


def test_mix_holds_the_train_records_then_every_question_once_in_dialogues(records):
    by_id = {r.id: r for r in records["train"]}
    asked = []
    mix = _read_jsonl(DATA_DIR / build_dataset.MIX_FILE)
    assert mix[: len(by_id)] == _read_jsonl(DATA_DIR / "kwanzaa_train.jsonl")
    for line in mix[len(by_id):]:
        ChatExample.model_validate(line)
        messages = line["messages"]
        ids = line["meta"]["questions"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(ids)
        assert users[0].startswith("Documents:\n[1] ") and users[0].count("\n[") == 3, ids
        assert all(u.startswith("Question: ") and "Documents:" not in u for u in users[1:]), ids
        for record_id, user, raw in zip(ids, users, answers):
            record = by_id[record_id]
            assert user.endswith(f"Question: {record.question}")
            parsed = parse_answer(raw)
            assert parsed.ok and parsed.answer.is_refusal == record.expect_refusal, record_id
            assert set(parsed.answer.cited_numbers()) <= {1, 2, 3}, record_id
            assert line["meta"]["expect_refusal"][ids.index(record_id)] == record.expect_refusal
        asked += ids
    assert sorted(asked) == sorted(by_id), "every train question once, and nothing from eval"


def test_build_is_deterministic_and_matches_committed_files():
    first = build_dataset.build_outputs()
    assert build_dataset.build_outputs() == first
    expected = [f"kwanzaa_{s}{k}.jsonl" for s in SPLITS for k in ("", "_records")] + [build_dataset.MIX_FILE]
    assert sorted(first) == sorted(expected)
    assert build_dataset.stale_files(first) == []
    assert build_dataset.main(["--check"]) == 0


def test_check_reports_an_edited_file(tmp_path):
    outputs = build_dataset.build_outputs()
    build_dataset.write_outputs(outputs, tmp_path)
    assert build_dataset.stale_files(outputs, tmp_path) == []
    path = tmp_path / "kwanzaa_eval.jsonl"
    path.write_text(path.read_text(encoding="utf-8").replace("Kwanzaa", "Kwanza", 1), encoding="utf-8")
    (tmp_path / "kwanzaa_train_records.jsonl").unlink()
    assert build_dataset.stale_files(outputs, tmp_path) == ["kwanzaa_eval.jsonl", "kwanzaa_train_records.jsonl"]


def test_invalid_question_is_reported_by_id(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "documents.jsonl").write_text(
        (DATA_DIR / "source" / "documents.jsonl").read_text(encoding="utf-8"), encoding="utf-8"
    )
    bad = {
        "id": "bad.q1", "split": "train", "question": "Who created Kwanzaa?", "doc_ids": ["kwanzaa_origin"],
        "answer_text": "Kwanzaa was created in 1966 {d:kwanzaa_dates}.", "completeness": "complete",
        "missing_context": [],
    }
    (source / "questions.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="question 'bad.q1'"):
        build_dataset.build_records(source)
