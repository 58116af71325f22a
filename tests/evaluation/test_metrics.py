"""Behavioral metrics pinned on hand-written outputs."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from kwanzaa_adapter.data.records import Document, RagRecord
from kwanzaa_adapter.evaluation.metrics import (
    Example,
    aggregate,
    compute_citation_rate,
    compute_json_validity_rate,
    compute_refusal_correctness_rate,
    compute_retrieval_groundedness_rate,
    compute_answer_correctness_rate,
    compute_exact_answer_rate,
    compute_gold_citation_precision,
    content_words,
    score_example,
    split_sentences,
)

ORIGINS = Document(
    title="Origins of Kwanzaa",
    text="Maulana Karenga created Kwanzaa in 1966 as a week-long celebration of African heritage.",
)
PRINCIPLES = Document(
    title="The Seven Principles",
    text="The Nguzo Saba include Umoja (unity) and Kujichagulia (self-determination).",
)
DOCS = [ORIGINS, PRINCIPLES]
ANSWERABLE = Example(question="Who created Kwanzaa?", documents=DOCS, expect_refusal=False)
UNANSWERABLE = Example(question="What did Karenga eat?", documents=DOCS, expect_refusal=True)


def answer(text: str, citations=(), completeness: str = "complete") -> str:
    return json.dumps(
        {
            "version": "kwanzaa.answer.v1",
            "answer": {"text": text, "confidence": 0.8, "completeness": completeness},
            "sources": [{"citation": n, "title": f"doc {n}"} for n in citations],
            "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []},
        }
    )


GOOD = answer("Maulana Karenga created Kwanzaa in 1966 [1].", [1])
REFUSAL = answer("The documents do not say.", [], completeness="insufficient_data")


# --------------------------------------------------------------------------- json validity


def test_json_validity_accepts_surrounding_whitespace_only():
    assert compute_json_validity_rate(["\n  " + GOOD + "\n"]) == 1.0


@pytest.mark.parametrize(
    "output",
    [
        "Sure! " + GOOD,
        GOOD + " Hope this helps.",
        "```json\n" + GOOD + "\n```",
        GOOD + GOOD,
        "",
        "   ",
        GOOD[:-1],
        json.dumps({"answer": {"text": "x"}}),
    ],
    ids=[
        "prose-before", "prose-after", "code-fence", "two-objects", "empty", "blank", "truncated", "contract-violation"
    ],
)
def test_json_validity_rejects_anything_but_one_contract_object(output):
    verdict = score_example(ANSWERABLE, output)
    assert verdict["json_valid"] is False
    assert verdict["parse_error"]
    assert compute_json_validity_rate([output]) == 0.0


def test_json_validity_rate_is_share_of_valid_outputs():
    assert compute_json_validity_rate([GOOD, REFUSAL, "nope"]) == 2 / 3


def test_json_validity_rate_is_none_without_outputs():
    assert compute_json_validity_rate([]) is None


# --------------------------------------------------------------------------- citation


@pytest.mark.parametrize(
    "text, citations, ok",
    [
        ("Karenga created Kwanzaa in 1966 [1].", [1], True),
        ("Karenga created Kwanzaa [1] and its principles [2].", [1, 2], True),
        ("Karenga created Kwanzaa [1]. He created it in 1966 [1].", [1], True),
        ("Karenga created Kwanzaa [3].", [3], False),
        ("Karenga created Kwanzaa [1] and more [3].", [1, 3], False),
        ("Karenga created Kwanzaa [0].", [], False),
        ("Karenga created Kwanzaa [1].", [1, 2], False),
        ("Karenga created Kwanzaa [1] and [2].", [1], False),
        ("Karenga created Kwanzaa [1].", [1, 1], False),
        ("Karenga created Kwanzaa in 1966.", [], False),
        ("Karenga created Kwanzaa in 1966.", [1], False),
    ],
    ids=[
        "one-cited-one-listed",
        "two-cited-two-listed",
        "duplicate-markers-are-fine",
        "cites-document-not-provided",
        "one-of-two-not-provided",
        "document-zero-not-provided",
        "sources-list-uncited-document",
        "cited-document-missing-from-sources",
        "duplicate-sources-entry",
        "no-marker",
        "source-without-marker",
    ],
)
def test_citation_ok_requires_provided_cited_documents_listed_exactly_once(text, citations, ok):
    assert score_example(ANSWERABLE, answer(text, citations))["citation_ok"] is ok


def test_citation_fails_for_invalid_output_and_for_refusal_of_answerable_question():
    assert score_example(ANSWERABLE, "")["citation_ok"] is False
    assert score_example(ANSWERABLE, "Sure! " + GOOD)["citation_ok"] is False
    assert score_example(ANSWERABLE, REFUSAL)["citation_ok"] is False


def test_citation_does_not_apply_to_examples_that_should_be_refused():
    assert score_example(UNANSWERABLE, GOOD)["citation_ok"] is None
    assert compute_citation_rate([UNANSWERABLE, UNANSWERABLE], [GOOD, REFUSAL]) is None


def test_citation_rate_counts_only_answerable_examples():
    examples = [ANSWERABLE, ANSWERABLE, ANSWERABLE, UNANSWERABLE]
    outputs = [GOOD, answer("Karenga [3].", [3]), GOOD, "garbage"]
    assert compute_citation_rate(examples, outputs) == 2 / 3


# --------------------------------------------------------------------------- refusal


def test_refusal_is_insufficient_data_with_no_sources():
    verdict = score_example(UNANSWERABLE, REFUSAL)
    assert (verdict["refused"], verdict["refusal_correct"]) == (True, True)


def test_refusal_that_still_cites_is_not_a_refusal():
    citing = answer("The documents do not say, but see [1].", [1], completeness="insufficient_data")
    verdict = score_example(UNANSWERABLE, citing)
    assert verdict["json_valid"] is True
    assert (verdict["refused"], verdict["refusal_correct"]) == (False, False)
    assert verdict["citation_ok"] is None
    assert verdict["cited"] == [1]
    # An answerable question "refused" this way is an answer: refusal is right, citation holds.
    verdict = score_example(ANSWERABLE, citing)
    assert (verdict["refused"], verdict["refusal_correct"], verdict["citation_ok"]) == (False, True, True)


def test_empty_sources_with_complete_answer_is_not_a_refusal():
    verdict = score_example(UNANSWERABLE, answer("Karenga ate yams.", [], completeness="complete"))
    assert (verdict["refused"], verdict["refusal_correct"]) == (False, False)


def test_invalid_output_is_wrong_whether_or_not_refusal_was_expected():
    for example in (ANSWERABLE, UNANSWERABLE):
        verdict = score_example(example, "I cannot answer that.")
        assert (verdict["refused"], verdict["refusal_correct"]) == (False, False)


def test_refusal_correctness_rate_is_over_all_examples():
    examples = [ANSWERABLE, ANSWERABLE, UNANSWERABLE, UNANSWERABLE]
    outputs = [GOOD, REFUSAL, REFUSAL, ""]
    assert compute_refusal_correctness_rate(examples, outputs) == 2 / 4


# --------------------------------------------------------------------------- groundedness


def test_content_words_drop_stop_words_short_tokens_and_markers_but_keep_years():
    assert content_words("The celebration was created by Karenga in 1966 [12].") == {
        "celebration",
        "created",
        "karenga",
        "1966",
    }


def test_split_sentences_keeps_markers_with_the_sentence_they_end():
    text = "X began in 1966 [1]. Y lasts 7.5 days! Z follows.[2] [1] Last one"
    assert split_sentences(text) == ["X began in 1966 [1].", "Y lasts 7.5 days!", "Z follows.[2] [1]", "Last one"]


def test_grounded_sentence_scores_one_wherever_the_marker_sits():
    at_end = answer("Maulana Karenga created Kwanzaa in 1966 [1].", [1])
    inside = answer("In 1966 [1] Maulana Karenga created Kwanzaa.", [1])
    after_stop = answer("Maulana Karenga created Kwanzaa in 1966. [1]", [1])
    for output in (at_end, inside, after_stop):
        assert score_example(ANSWERABLE, output)["groundedness"] == 1.0


def test_sentence_without_marker_lowers_groundedness():
    output = answer("Maulana Karenga created Kwanzaa in 1966 [1]. It honors African heritage.", [1])
    assert score_example(ANSWERABLE, output)["groundedness"] == 1 / 2


def test_marker_to_unrelated_or_missing_document_does_not_ground():
    wrong_doc = answer("Maulana Karenga created Kwanzaa in 1966 [2].", [2])
    missing_doc = answer("Maulana Karenga created Kwanzaa in 1966 [3].", [3])
    assert score_example(ANSWERABLE, wrong_doc)["groundedness"] == 0.0
    assert score_example(ANSWERABLE, missing_doc)["groundedness"] == 0.0


def test_any_cited_document_covering_the_sentence_grounds_it():
    output = answer("Maulana Karenga created Kwanzaa in 1966 [2] [1].", [1, 2])
    assert score_example(ANSWERABLE, output)["groundedness"] == 1.0


def test_document_must_cover_at_least_half_of_the_content_words():
    # {karenga, created, harlem, festivals}: two of four are in document 1.
    half = answer("Karenga created Harlem festivals [1].", [1])
    # {karenga, organized, harlem, festivals}: one of four.
    quarter = answer("Karenga organized Harlem festivals [1].", [1])
    assert score_example(ANSWERABLE, half)["groundedness"] == 1.0
    assert score_example(ANSWERABLE, quarter)["groundedness"] == 0.0


def test_document_title_counts_as_document_words():
    output = answer("The seven principles [2].", [2])
    assert score_example(ANSWERABLE, output)["groundedness"] == 1.0


def test_groundedness_applies_to_answers_only():
    assert score_example(ANSWERABLE, REFUSAL)["groundedness"] is None
    assert score_example(ANSWERABLE, "nope")["groundedness"] is None
    # An answer to a question that should be refused is still scored on its claims.
    assert score_example(UNANSWERABLE, GOOD)["groundedness"] == 1.0


def test_groundedness_rate_averages_over_answered_examples_and_is_none_without_any():
    examples = [ANSWERABLE, ANSWERABLE, UNANSWERABLE, ANSWERABLE]
    half = answer("Maulana Karenga created Kwanzaa in 1966 [1]. It honors heritage.", [1])
    assert compute_retrieval_groundedness_rate(examples, [GOOD, half, REFUSAL, "bad"]) == 3 / 4
    assert compute_retrieval_groundedness_rate([UNANSWERABLE, ANSWERABLE], [REFUSAL, ""]) is None


def test_empty_answer_text_is_ungrounded():
    assert score_example(ANSWERABLE, answer("", []))["groundedness"] == 0.0


# --------------------------------------------------------------------------- shared definition


def test_verdict_has_exactly_the_documented_keys_and_is_json_serializable():
    verdict = score_example(ANSWERABLE, GOOD)
    assert verdict == {
        "json_valid": True,
        "parse_error": None,
        "refused": False,
        "refusal_correct": True,
        "citation_ok": True,
        "groundedness": 1.0,
        "cited": [1],
        "gold_cited": None,  # this example names no gold document
        # and carries no answer key: none of the correctness verdicts applies
        "facts_missing": None, "correct": None, "cited_gold": None, "cited_other": None, "exact": None,
    }
    json.dumps(verdict)
    graded = Example(ANSWERABLE.question, DOCS, expect_refusal=False, gold=frozenset({1}), key_facts=("1966",))
    assert {k: v for k, v in score_example(graded, GOOD).items() if k in ("facts_missing", "correct", "cited_gold",
                                                                          "cited_other", "exact")} == {
        "facts_missing": [], "correct": True, "cited_gold": 1, "cited_other": 0, "exact": True}
    json.dumps(score_example(graded, GOOD))


def test_gold_citation_rate_counts_due_answers_that_cite_a_document_holding_the_answer():
    with_gold = Example(question="Who created Kwanzaa?", documents=DOCS, expect_refusal=False, gold=frozenset({1}))
    examples = [with_gold, with_gold, with_gold, UNANSWERABLE]
    # cites the gold document; cites only the other one (a valid citation all the same); refuses; answers
    # an unanswerable question (no gold document: not counted)
    outputs = [GOOD, answer("Karenga made it [2].", [2]), REFUSAL, GOOD]
    verdicts = [score_example(e, o) for e, o in zip(examples, outputs)]
    assert [v["gold_cited"] for v in verdicts] == [True, False, None, None]
    rates = aggregate(verdicts)
    assert rates["gold_citation_rate"] == 0.5
    assert rates["citation_rate"] == 2 / 3


def test_aggregate_of_verdicts_equals_the_compute_functions():
    examples = [ANSWERABLE, ANSWERABLE, UNANSWERABLE, UNANSWERABLE, ANSWERABLE]
    outputs = [GOOD, answer("Karenga [3].", [3]), REFUSAL, GOOD, "Sure! " + GOOD]
    rates = aggregate([score_example(e, o) for e, o in zip(examples, outputs)])
    assert rates == {
        "json_validity_rate": compute_json_validity_rate(outputs),
        "citation_rate": compute_citation_rate(examples, outputs),
        "refusal_correctness_rate": compute_refusal_correctness_rate(examples, outputs),
        "retrieval_groundedness_rate": compute_retrieval_groundedness_rate(examples, outputs),
        "gold_citation_rate": None,  # the examples name no gold document
        "answer_correctness_rate": compute_answer_correctness_rate(examples, outputs),
        "gold_citation_precision": compute_gold_citation_precision(examples, outputs),
        "exact_answer_rate": compute_exact_answer_rate(examples, outputs),
    }
    assert rates == {
        "json_validity_rate": 4 / 5,
        "citation_rate": 1 / 3,
        "refusal_correctness_rate": 3 / 5,
        "retrieval_groundedness_rate": (1.0 + 0.0 + 1.0) / 3,
        "gold_citation_rate": None,
        "answer_correctness_rate": None,  # the examples carry no answer key
        "gold_citation_precision": None,
        "exact_answer_rate": None,
    }


def test_aggregate_of_nothing_is_all_none():
    assert aggregate([]) == dict.fromkeys(
        ["json_validity_rate", "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate",
         "gold_citation_rate", "answer_correctness_rate", "gold_citation_precision", "exact_answer_rate"]
    )


def test_mismatched_examples_and_outputs_are_rejected():
    with pytest.raises(ValueError, match="2 examples but 1 outputs"):
        compute_citation_rate([ANSWERABLE, ANSWERABLE], [GOOD])


def test_rag_records_and_plain_objects_serve_as_examples():
    record = RagRecord(id="r1", question="Who?", documents=DOCS, expect_refusal=False)
    plain = SimpleNamespace(
        question="Who?",
        documents=[SimpleNamespace(title=d.title, text=d.text) for d in DOCS],
        expect_refusal=False,
    )
    expected = score_example(ANSWERABLE, GOOD)
    assert score_example(record, GOOD) == expected
    assert score_example(Example.from_record(record), GOOD) == expected
    assert score_example(plain, GOOD) == expected
