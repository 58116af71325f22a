"""Is the answer right? The correctness rates on hand-made outputs, and the answer key checked as data."""

from __future__ import annotations

import json
import logging

import pytest

from kwanzaa_adapter.data.facts import normalize, states
from kwanzaa_adapter.data.records import Document, RagRecord
from kwanzaa_adapter.data.validation import validate_file
from kwanzaa_adapter.evaluation.eval_set import EvaluationDataError, load_eval_items
from kwanzaa_adapter.evaluation.metrics import Example, aggregate, score_example

ORIGIN = Document(title="How Kwanzaa Began", text="Maulana Karenga created Kwanzaa in 1966. It lasts seven days.")
DATES = Document(title="The Days", text="Kwanzaa runs from December 26 to January 1.")
OTHER = Document(title="Jazz", text="Louis Armstrong moved to Chicago in 1922.")
DOCS = [OTHER, ORIGIN, DATES]
# Document 2 holds the answer: who, and when.
GRADED = Example("Who created Kwanzaa, and when?", DOCS, expect_refusal=False, gold=frozenset({2}),
                 key_facts=("Maulana Karenga", "1966"))


def answer(text: str, cited=(), completeness: str = "complete") -> str:
    return json.dumps({"version": "kwanzaa.answer.v1",
                       "answer": {"text": text, "confidence": 0.9, "completeness": completeness},
                       "sources": [{"citation": n, "title": DOCS[n - 1].title} for n in cited],
                       "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []}})


RIGHT = answer("Maulana Karenga created Kwanzaa in 1966 [2].", [2])
WRONG_DOCUMENT = answer("Maulana Karenga created Kwanzaa in 1966 [3].", [3])
EXTRA_CITATION = answer("Maulana Karenga created Kwanzaa [2] in 1966 [1].", [2, 1])
GARBLED = answer("Maulana Karenge created Kwanzaa in 1967 [2].", [2])
REFUSAL = answer("The documents do not say.", completeness="insufficient_data")


def rates(*outputs: str, example: Example = GRADED) -> dict:
    return aggregate([score_example(example, output) for output in outputs])


def test_a_right_answer_citing_only_gold_is_correct_precise_and_exact():
    verdict = score_example(GRADED, RIGHT)
    assert (verdict["correct"], verdict["exact"], verdict["facts_missing"]) == (True, True, [])
    result = rates(RIGHT)
    assert [result[k] for k in ("answer_correctness_rate", "gold_citation_precision", "exact_answer_rate")] == [1, 1, 1]


def test_a_right_fact_cited_to_a_wrong_document_is_correct_but_neither_precise_nor_exact():
    verdict = score_example(GRADED, WRONG_DOCUMENT)
    assert verdict["correct"] is True and verdict["exact"] is False
    assert (verdict["cited_gold"], verdict["cited_other"]) == (0, 1)
    assert rates(WRONG_DOCUMENT)["gold_citation_precision"] == 0.0


def test_an_extra_citation_halves_precision_and_spoils_the_exact_answer():
    verdict = score_example(GRADED, EXTRA_CITATION)
    assert verdict["correct"] is True and verdict["exact"] is False
    assert rates(EXTRA_CITATION)["gold_citation_precision"] == 0.5
    # Precision counts citations, not answers: one precise answer and this one give 2 of 3.
    assert rates(RIGHT, EXTRA_CITATION)["gold_citation_precision"] == pytest.approx(2 / 3)


def test_a_garbled_key_fact_is_not_correct_and_names_what_is_missing():
    verdict = score_example(GRADED, GARBLED)
    assert verdict["correct"] is False and verdict["exact"] is False
    assert verdict["facts_missing"] == ["Maulana Karenga", "1966"]
    assert rates(GARBLED)["answer_correctness_rate"] == 0.0


def test_a_refusal_of_an_answerable_question_is_wrong_and_cites_nothing_to_count():
    verdict = score_example(GRADED, REFUSAL)
    assert (verdict["correct"], verdict["exact"], verdict["cited_gold"]) == (False, False, None)
    assert rates(REFUSAL)["gold_citation_precision"] is None
    assert rates(RIGHT, REFUSAL)["answer_correctness_rate"] == 0.5
    invalid = score_example(GRADED, "not json")
    assert invalid["correct"] is False and invalid["facts_missing"] == list(GRADED.key_facts)


def test_records_without_an_answer_key_leave_the_correctness_rates_na():
    plain = Example("Who created Kwanzaa?", DOCS, expect_refusal=False, gold=frozenset({2}))
    refusal = Example("Who ate first?", DOCS, expect_refusal=True)
    for example, output in ((plain, RIGHT), (refusal, REFUSAL)):
        verdict = score_example(example, output)
        assert verdict["correct"] is None and verdict["cited_gold"] is None
    result = aggregate([score_example(plain, RIGHT), score_example(refusal, REFUSAL)])
    assert {k: result[k] for k in ("answer_correctness_rate", "gold_citation_precision", "exact_answer_rate")} == {
        "answer_correctness_rate": None, "gold_citation_precision": None, "exact_answer_rate": None}


@pytest.mark.parametrize("text, fact, stated", [
    ("It lasts seven days [2].", "7 days", True),
    ("It lasts 7 days.", "seven days", True),
    ("Created in 1966.", "1966", True),
    ("Created in 19666.", "1966", False),
    ("The Ninth and Tenth Cavalry", "9th and 10th Cavalry", True),
    ("It cost $1,000.", "1000", True),
    ("KARENGA'S holiday!", "karenga holiday", True),
    ("Karengas", "Karenga", False),
])
def test_key_facts_are_compared_with_case_punctuation_and_number_words_normalised(text, fact, stated):
    assert states(text, fact) is stated


def test_normalize_writes_digits_and_single_spaces():
    assert normalize("Twenty-one  Days, [3] Forty!") == "20 1 days 40"


# --------------------------------------------------------------------------- the answer key as data


RECORD = {"id": "r1", "question": "Who created Kwanzaa?", "expect_refusal": False,
          "documents": [d.model_dump(exclude_none=True) for d in DOCS], "gold_documents": [2],
          "key_facts": ["Maulana Karenga"]}


def chat_line(line_id: str = "c1", **meta) -> dict:
    return {"messages": [{"role": "user", "content": "Question: Who created Kwanzaa?"},
                         {"role": "assistant", "content": RIGHT}],
            "meta": {"id": line_id, "expect_refusal": False, "documents": RECORD["documents"], **meta}}


def write(path, *lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_a_key_fact_no_gold_document_states_fails_validation_with_its_line(tmp_path):
    bad = {**RECORD, "id": "r2", "key_facts": ["Louis Armstrong"]}  # in document 1, which is not gold
    path = write(tmp_path / "records.jsonl", RECORD, bad)
    result = validate_file(path)
    assert [(issue.line, issue.kind) for issue in result.issues] == [(2, "answer_contract")]
    assert "'Louis Armstrong' is stated by none of the gold documents [2]" in result.issues[0].message
    with pytest.raises(EvaluationDataError, match=r"records.jsonl:2: .*Louis Armstrong"):
        load_eval_items(path)


def test_a_chat_line_answer_key_is_checked_like_a_records(tmp_path):
    path = write(tmp_path / "chat.jsonl", chat_line("c1", gold_documents=[2], key_facts=["1966"]),
                 chat_line("c2", gold_documents=[2], key_facts=["1922"]),
                 chat_line("c3", gold_documents=[4], key_facts=["x"]))
    result = validate_file(path)
    assert [(issue.line, issue.kind) for issue in result.issues] == [(2, "answer_key"), (3, "answer_key")]
    assert "gold_documents [4] outside the 3 documents" in result.issues[1].message
    with pytest.raises(EvaluationDataError, match=r"chat.jsonl:2: meta: .*'1922'"):
        load_eval_items(path)


@pytest.mark.parametrize("change, message", [
    ({"expect_refusal": True}, "belong to answerable records"),
    ({"gold_documents": None}, "needs gold_documents"),
    ({"gold_documents": [2, 2]}, "repeats"),
])
def test_an_answer_key_must_fit_its_record(change, message):
    with pytest.raises(ValueError, match=message):
        RagRecord.model_validate({**RECORD, **change})


def test_eval_items_carry_the_key_and_the_question_alone(tmp_path):
    record_item, chat_item = load_eval_items(write(tmp_path / "e.jsonl", RECORD, chat_line(
        gold_documents=[2], key_facts=["1966"])))
    assert record_item.example.key_facts == ("Maulana Karenga",) and record_item.example.gold == {2}
    assert chat_item.example.key_facts == ("1966",) and chat_item.example.graded
    assert chat_item.example.question == "Who created Kwanzaa?"


def test_an_eval_file_without_answer_keys_logs_why_the_rates_are_na(tmp_path, caplog):
    from kwanzaa_adapter.evaluation.behavior import log_ungraded

    path = write(tmp_path / "plain.jsonl", {k: v for k, v in RECORD.items() if k not in ("gold_documents", "key_facts")})
    with caplog.at_level(logging.INFO, logger="kwanzaa_adapter.evaluation.behavior"):
        log_ungraded(load_eval_items(path), path)
    assert [r.getMessage() for r in caplog.records if "n/a" in r.getMessage()] == [
        f"answer correctness, gold citation precision, exact answers: n/a: no record of {path} carries an answer key "
        "(gold_documents and key_facts)"]
