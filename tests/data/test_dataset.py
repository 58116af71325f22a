"""The shipped dataset under data/: contract-valid, leak-free, balanced, grounded and reproducible."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, load_script
from kwanzaa_adapter.contract import CITATION_MARKER, parse_answer
from kwanzaa_adapter.data.records import ChatExample, RagRecord, render_record
from kwanzaa_adapter.evaluation.metrics import GROUNDING_THRESHOLD, content_words, score_example, split_sentences

DATA_DIR = ROOT / "data"
SOURCE_DIR = DATA_DIR / "source"
SPLITS = ("train", "eval", "heldout")
REFUSAL_KINDS = ("nearby_detail", "off_topic", "mentions_subject")
URL = re.compile(r"^https://example\.(org|com)/\S+$")
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
    return _read_jsonl(SOURCE_DIR / "documents.jsonl") + _read_jsonl(SOURCE_DIR / "heldout_documents.jsonl")


@pytest.fixture(scope="module")
def source_questions() -> dict[str, dict]:
    rows = _read_jsonl(SOURCE_DIR / "questions.jsonl") + _read_jsonl(SOURCE_DIR / "heldout_questions.jsonl")
    return {row["id"]: row for row in rows}


@pytest.fixture(scope="module")
def near_miss_lines() -> list[dict]:
    return _read_jsonl(DATA_DIR / build_dataset.NEAR_MISS_FILE)


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
            key = record.model_dump(include={"gold_documents", "key_facts"}, exclude_none=True)
            assert line["meta"] == {"id": record.id, "expect_refusal": record.expect_refusal, "split": split,
                                    "documents": documents, **key}
            assert bool(key) == (split != "train" and not record.expect_refusal), record.id  # eval sets carry keys


def test_refusals_are_empty_and_name_what_is_missing(records, near_miss_lines):
    near_misses = [RagRecord(id=line["meta"]["id"], question=line["messages"][1]["content"],
                             documents=line["meta"]["documents"], expect_refusal=True,
                             answer=parse_answer(line["messages"][-1]["content"]).answer) for line in near_miss_lines]
    for record in [r for split in SPLITS for r in records[split]] + near_misses:
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


def test_no_question_or_document_leaks_into_an_earlier_split(records):
    """Eval shares nothing with train; heldout shares nothing with train or eval."""
    for split, earlier in (("eval", ("train",)), ("heldout", ("train", "eval"))):
        seen = [r for name in earlier for r in records[name]]
        questions = {r.question.strip().lower() for r in seen}
        titles = {d.title for r in seen for d in r.documents}
        blob = "\n".join({d.text for r in seen for d in r.documents} | titles | questions)
        for record in records[split]:
            assert record.question.strip().lower() not in questions, record.id
            for doc in record.documents:
                assert doc.title not in titles, f"{record.id}: {split} document {doc.title!r} is in {earlier}"
                assert doc.text not in blob, f"{record.id}: text of {doc.title!r} is in {earlier}"


def _subject(title: str) -> str:
    """'Gloves: Joe Louis' -> 'joe louis'; 'Morgan, Garrett (1877–1963)' -> 'garrett morgan'."""
    name = title.split(":")[-1].split("(")[0].strip().lower().removeprefix("the ")
    if "," in name:
        last, first = name.split(",", 1)
        name = f"{first.strip()} {last.strip()}"
    return name


def test_heldout_set_has_its_own_subjects(source_documents):
    """No heldout document is about a person or event that has a train or eval document."""
    earlier = {_subject(d["title"]) for d in source_documents if d["split"] != "heldout"}
    for doc in source_documents:
        if doc["split"] == "heldout":
            subject = _subject(doc["title"])
            clashes = [title for title in earlier if title in subject or subject in title]
            assert not clashes, f"{doc['doc_id']}: {subject!r} is also the subject of {clashes}"


def test_source_documents_are_split_disjoint_and_follow_the_datasheet(source_documents, records):
    assert len({d["doc_id"] for d in source_documents}) == len(source_documents)
    assert len({d["title"] for d in source_documents}) == len(source_documents)
    for doc in source_documents:
        assert {"doc_id", "split", "topic", "title", "source", "text"} <= set(doc), doc["doc_id"]
        assert set(doc) <= {"doc_id", "split", "topic", "title", "source", "year", "url", "text"}, doc["doc_id"]
        assert 15 <= len(doc["text"].split()) <= 90, doc["doc_id"]
    for split in SPLITS:
        allowed = {d["title"] for d in source_documents if d["split"] == split}
        shown = {d.title for r in records[split] for d in r.documents}
        assert shown <= allowed, f"{split} records show documents of another split: {shown - allowed}"


def test_documents_vary_in_source_length_date_and_address(source_documents):
    labels = Counter(d["source"] for d in source_documents)
    assert len(labels) >= 10, labels
    assert max(labels.values()) <= 0.15 * len(source_documents), labels
    # Generic labels for a kind of note, never a named publication.
    assert all(label == label.lower() for label in labels), labels
    dated = [d for d in source_documents if "year" in d]
    assert len(dated) >= 0.7 * len(source_documents)
    for doc in dated:
        assert 1990 <= doc["year"] <= 2024, doc["doc_id"]
        mentioned = [int(y) for y in re.findall(r"\b(1[6-9]\d\d|20[0-2]\d)\b", doc["text"])]
        assert all(year < doc["year"] for year in mentioned), f"{doc['doc_id']}: dated before what it tells"
    linked = [d["url"] for d in source_documents if "url" in d]
    assert 0.15 * len(source_documents) <= len(linked) < len(source_documents)
    assert len(set(linked)) == len(linked)
    assert all(URL.match(url) for url in linked), [url for url in linked if not URL.match(url)]
    sentences = Counter(min(len(split_sentences(d["text"])), 5) for d in source_documents)
    assert sentences[2] >= 5 and sentences[5] >= 5, sentences


def test_split_sizes_refusal_share_and_two_document_answers(records):
    assert len(records["train"]) >= 250
    assert len(records["eval"]) >= 75
    assert 50 <= len(records["heldout"]) <= 60
    for split in SPLITS:
        share = sum(r.expect_refusal for r in records[split]) / len(records[split])
        assert 0.25 <= share <= 0.35, f"{split} refusal share {share:.2f}"
        answered = [r for r in records[split] if not r.expect_refusal]
        two_doc = sum(len(r.answer.sources) == 2 for r in answered)
        assert two_doc >= 5, f"{split} has only {two_doc} records citing two documents"
    train_answered = [r for r in records["train"] if not r.expect_refusal]
    assert sum(len(r.answer.sources) == 2 for r in train_answered) >= 0.13 * len(train_answered)


def test_every_refusal_kind_is_present_in_every_split(records, source_questions):
    for split in SPLITS:
        kinds = Counter(source_questions[r.id].get("refusal") for r in records[split] if r.expect_refusal)
        assert set(kinds) == set(REFUSAL_KINDS), f"{split}: {kinds}"
        assert min(kinds.values()) >= 4, f"{split}: {kinds}"
    for question in source_questions.values():
        assert ("refusal" in question) == (question["completeness"] == "insufficient_data"), question["id"]


def test_off_topic_refusals_show_nothing_of_their_subject(records, source_questions, source_documents):
    by_id = {d["doc_id"]: d for d in source_documents}
    topic_of_title = {d["title"]: d["topic"] for d in source_documents}
    for record in [r for split in SPLITS for r in records[split]]:
        question = source_questions[record.id]
        shown_topics = {topic_of_title[d.title] for d in record.documents}
        subject_topics = {by_id[doc_id]["topic"] for doc_id in question["doc_ids"]}
        shown_titles = {d.title for d in record.documents}
        subject_titles = {by_id[doc_id]["title"] for doc_id in question["doc_ids"]}
        if question.get("refusal") == "off_topic":
            assert not shown_topics & subject_topics, record.id
        else:
            assert subject_titles <= shown_titles, f"{record.id}: a relevant document is missing"


def test_documents_per_record_vary_from_one_to_five(records):
    for split, allowed in (("train", {1, 2, 3, 4, 5}), ("eval", {1, 2, 3, 4, 5}), ("heldout", {2, 3, 4, 5})):
        counts = Counter(len(r.documents) for r in records[split])
        assert set(counts) == allowed, f"{split}: {counts}"
        assert max(counts.values()) <= 0.5 * len(records[split]), f"{split}: {counts}"
    single = [r for r in records["train"] if len(r.documents) == 1]
    assert any(r.expect_refusal for r in single) and any(not r.expect_refusal for r in single)


def test_relevant_documents_are_not_always_first_or_last(records):
    for split in SPLITS:
        places = Counter()
        for record in records[split]:
            count = len(record.documents)
            if count < 2:
                continue
            for n in record.answer.cited_numbers():
                places["first" if n == 1 else "last" if n == count else "middle"] += 1
        total = sum(places.values())
        assert places["first"] <= 0.5 * total and places["last"] <= 0.5 * total, f"{split}: {places}"
        assert places["middle"] >= 5, f"{split}: {places}"


def test_answer_sentences_are_grounded_in_a_cited_document(records):
    """Stricter than the metric: every sentence has content words and a marker, and text alone counts."""
    for record in [r for split in SPLITS for r in records[split]]:
        if record.expect_refusal:
            continue
        for sentence in split_sentences(record.answer.answer.text):
            words = content_words(sentence)
            cited = [int(n) for n in CITATION_MARKER.findall(sentence)]
            assert cited, f"{record.id}: sentence without a citation: {sentence!r}"
            assert sentence.rstrip().endswith(f"[{cited[-1]}]."), f"{record.id}: marker not at the end: {sentence!r}"
            assert words, f"{record.id}: sentence without content words: {sentence!r}"
            best = max(len(words & content_words(record.documents[n - 1].text)) / len(words) for n in cited)
            assert best >= GROUNDING_THRESHOLD, f"{record.id}: {sentence!r} shares only {best:.0%} with its source"


def test_gold_answers_score_perfectly_on_the_behavioral_metrics(records):
    for record in [r for split in SPLITS for r in records[split]]:
        verdict = score_example(record, record.answer.to_json())
        assert verdict["json_valid"] and verdict["refusal_correct"], record.id
        if record.expect_refusal:
            assert verdict["groundedness"] is None, record.id
        else:
            assert verdict["citation_ok"] and verdict["groundedness"] == 1.0, record.id


def test_near_miss_records_differ_from_their_original_in_exactly_one_document_of_the_same_topic(
        near_miss_lines, source_documents):
    topic_of_title = {d["title"]: d["topic"] for d in source_documents if d["split"] == "train"}
    originals = {line["meta"]["id"]: line for line in _read_jsonl(DATA_DIR / "kwanzaa_train.jsonl")}
    assert 40 <= len(near_miss_lines) <= 60
    assert len({line["meta"]["near_miss_of"] for line in near_miss_lines}) == len(near_miss_lines)
    for line in near_miss_lines:
        ChatExample.model_validate(line)
        meta = line["meta"]
        original = originals[meta["near_miss_of"]]
        assert set(meta) == {"id", "near_miss_of", "expect_refusal", "split", "documents"}
        assert meta["id"] == f"{meta['near_miss_of']}.near_miss" and meta["expect_refusal"] is True
        assert meta["split"] == "train" and original["meta"]["expect_refusal"] is False
        before, after = original["meta"]["documents"], meta["documents"]
        assert len(before) == len(after)
        changed = [n for n, (old, new) in enumerate(zip(before, after), start=1) if old != new]
        assert len(changed) == 1, meta["id"]
        old, new = before[changed[0] - 1], after[changed[0] - 1]
        assert topic_of_title[old["title"]] == topic_of_title[new["title"]] and old["title"] != new["title"]
        # The original gold answer cites exactly the swapped position, so it is the natural rejected answer.
        rejected = parse_answer(original["messages"][-1]["content"]).answer
        assert rejected.cited_numbers() == [changed[0]], meta["id"]
        chosen = parse_answer(line["messages"][-1]["content"]).answer
        assert chosen.is_refusal and chosen.unknowns.missing_context, meta["id"]
        question = original["messages"][1]["content"].rsplit("\n\nQuestion: ", 1)[1]
        assert line["messages"][1]["content"].endswith(f"\n\nQuestion: {question}")
        assert line["messages"][0] == original["messages"][0]


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
        shown = len(re.findall(r"^\[\d+\] ", users[0].split("\n\nQuestion: ")[0], flags=re.MULTILINE))
        assert users[0].startswith("Documents:\n[1] ") and 1 <= shown <= 5, ids
        assert len(ids) == 1 or shown <= build_dataset.DIALOGUE_MAX_DOCS, ids
        assert all(u.startswith("Question: ") and "Documents:" not in u for u in users[1:]), ids
        for record_id, user, raw in zip(ids, users, answers):
            record = by_id[record_id]
            assert user.endswith(f"Question: {record.question}")
            parsed = parse_answer(raw)
            assert parsed.ok and parsed.answer.is_refusal == record.expect_refusal, record_id
            assert set(parsed.answer.cited_numbers()) <= set(range(1, shown + 1)), record_id
            assert line["meta"]["expect_refusal"][ids.index(record_id)] == record.expect_refusal
        asked += ids
    assert sorted(asked) == sorted(by_id), "every train question once, and nothing from eval"


def test_build_is_deterministic_and_matches_committed_files():
    first = build_dataset.build_outputs()
    assert build_dataset.build_outputs() == first
    expected = [f"kwanzaa_{s}{k}.jsonl" for s in (*SPLITS, "paraphrase") for k in ("", "_records")]
    expected += [build_dataset.MIX_FILE, build_dataset.NEAR_MISS_FILE, build_dataset.DECISIONS_FILE]
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
    (tmp_path / build_dataset.NEAR_MISS_FILE).write_text("", encoding="utf-8")
    assert build_dataset.stale_files(outputs, tmp_path) == [
        "kwanzaa_eval.jsonl", build_dataset.NEAR_MISS_FILE, "kwanzaa_train_records.jsonl"]


def _copy_sources(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shutil.copytree(SOURCE_DIR, source)
    return source


def test_invalid_question_is_reported_by_id(tmp_path):
    source = _copy_sources(tmp_path)
    bad = {
        "id": "bad.q1", "split": "train", "question": "Who created Kwanzaa?", "doc_ids": ["kwanzaa_origin"],
        "answer_text": "Kwanzaa was created in 1966 {d:kwanzaa_dates}.", "completeness": "complete",
        "missing_context": [],
    }
    (source / "questions.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="question 'bad.q1'"):
        build_dataset.build_records(source)


def test_refusal_without_its_kind_is_rejected(tmp_path):
    source = _copy_sources(tmp_path)
    bad = {
        "id": "bad.r1", "split": "train", "question": "Who made the first kinara?", "doc_ids": ["kinara"],
        "answer_text": "The documents do not say who made the first kinara.", "completeness": "insufficient_data",
        "missing_context": ["maker of the first kinara"],
    }
    (source / "questions.jsonl").write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.r1"):
        build_dataset.build_records(source)


def test_near_miss_with_a_replacement_of_another_topic_is_rejected(tmp_path):
    source = _copy_sources(tmp_path)
    bad = {"question_id": "kwanzaa_origin.q1", "replacement_doc_id": "jesse_owens",
           "answer_text": "The documents do not say who created Kwanzaa.", "missing_context": ["who created Kwanzaa"]}
    (source / build_dataset.NEAR_MISS_SOURCE).write_text(json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="near miss of 'kwanzaa_origin.q1'.*topic"):
        build_dataset.build_near_misses(source)


def test_document_url_off_the_example_domains_is_rejected(tmp_path):
    source = _copy_sources(tmp_path)
    path = source / "documents.jsonl"
    rows = _read_jsonl(path)
    rows[0]["url"] = "https://www.kwanzaa-reference.net/origin"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    with pytest.raises(ValueError, match="url"):
        build_dataset.build_records(source)
