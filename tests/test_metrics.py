"""Behavioral metrics pinned on hand-written outputs, and the training-metrics history round trip."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from kwanzaa_adapter.data.records import Document, RagRecord
from kwanzaa_adapter.metrics import (
    HISTORY_FILE,
    SUMMARY_FILE,
    Example,
    MetricsTracker,
    TrainingMetrics,
    aggregate,
    compute_citation_rate,
    compute_json_validity_rate,
    compute_perplexity,
    compute_refusal_correctness_rate,
    compute_retrieval_groundedness_rate,
    content_words,
    load_history,
    log_training_progress,
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
    }
    json.dumps(verdict)


def test_aggregate_of_verdicts_equals_the_compute_functions():
    examples = [ANSWERABLE, ANSWERABLE, UNANSWERABLE, UNANSWERABLE, ANSWERABLE]
    outputs = [GOOD, answer("Karenga [3].", [3]), REFUSAL, GOOD, "Sure! " + GOOD]
    rates = aggregate([score_example(e, o) for e, o in zip(examples, outputs)])
    assert rates == {
        "json_validity_rate": compute_json_validity_rate(outputs),
        "citation_rate": compute_citation_rate(examples, outputs),
        "refusal_correctness_rate": compute_refusal_correctness_rate(examples, outputs),
        "retrieval_groundedness_rate": compute_retrieval_groundedness_rate(examples, outputs),
    }
    assert rates == {
        "json_validity_rate": 4 / 5,
        "citation_rate": 1 / 3,
        "refusal_correctness_rate": 3 / 5,
        "retrieval_groundedness_rate": (1.0 + 0.0 + 1.0) / 3,
    }


def test_aggregate_of_nothing_is_all_none():
    assert aggregate([]) == dict.fromkeys(
        ["json_validity_rate", "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate"]
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


# --------------------------------------------------------------------------- training metrics


def test_perplexity_is_exp_of_loss_and_overflow_safe():
    assert compute_perplexity(0.0) == 1.0
    assert compute_perplexity(2.0) == math.exp(2.0)
    assert compute_perplexity(1e6) == float("inf")
    assert compute_perplexity(None) is None


def test_tracker_writes_one_flushed_line_per_log_step(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 10, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.5})
    assert len((tmp_path / HISTORY_FILE).read_text().splitlines()) == 1
    tracker.log_metrics(TrainingMetrics(step=20, loss=1.5, tokens_per_second=100.0))
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [10, 20]
    assert [m.step for m in tracker.history] == [10, 20]


def test_tracker_fills_perplexity_from_eval_loss_and_ignores_unknown_keys(tmp_path):
    logged = MetricsTracker(tmp_path).log_metrics({"step": 5, "eval_loss": 1.0, "eval_runtime": 3.2})
    assert logged == TrainingMetrics(step=5, eval_loss=1.0, perplexity=math.e)


def test_metrics_without_step_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="'step'"):
        MetricsTracker(tmp_path).log_metrics({"loss": 1.0})


def test_summary_reports_final_and_best_values(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 10, "loss": 2.0, "tokens_per_second": 100.0, "wall_time": 5.0})
    tracker.log_metrics({"step": 10, "eval_loss": 1.8})
    tracker.log_metrics({"step": 20, "loss": 1.2, "tokens_per_second": 300.0, "wall_time": 9.0})
    tracker.log_metrics({"step": 20, "eval_loss": 1.9})
    tracker.log_metrics({"step": 30, "loss": 1.4})
    assert tracker.summary() == {
        "steps": 30,
        "log_entries": 5,
        "final_loss": 1.4,
        "best_loss": 1.2,
        "final_eval_loss": 1.9,
        "best_eval_loss": 1.8,
        "best_eval_step": 10,
        "final_perplexity": math.exp(1.9),
        "mean_tokens_per_second": 200.0,
        "wall_time": 9.0,
    }
    path = tracker.save_summary()
    assert path == tmp_path / SUMMARY_FILE
    assert json.loads(path.read_text()) == tracker.summary()


def test_summary_of_empty_history_has_no_values(tmp_path):
    summary = MetricsTracker(tmp_path).summary()
    assert summary["steps"] == 0 and summary["log_entries"] == 0
    assert {k for k, v in summary.items() if v is not None} == {"steps", "log_entries"}


def test_history_round_trips_and_tolerates_truncated_last_line(tmp_path):
    tracker = MetricsTracker(tmp_path)
    tracker.log_metrics({"step": 1, "loss": 3.0})
    tracker.log_metrics({"step": 2, "loss": 2.5, "eval_loss": 2.4})
    history_path = tmp_path / HISTORY_FILE
    assert load_history(history_path) == tracker.history
    with history_path.open("a") as handle:
        handle.write('{"step": 3, "loss": 2.')  # a crash mid-write
    assert load_history(history_path) == tracker.history


def test_truncated_line_before_the_end_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / HISTORY_FILE
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    with pytest.raises(ValueError, match=f"{HISTORY_FILE}:2:"):
        load_history(path)


def test_resumed_tracker_drops_truncated_tail_and_keeps_appending(tmp_path):
    first = MetricsTracker(tmp_path)
    first.log_metrics({"step": 1, "loss": 3.0})
    with (tmp_path / HISTORY_FILE).open("a") as handle:
        handle.write('{"step": 2, "lo')
    resumed = MetricsTracker(tmp_path, resume=True)
    resumed.log_metrics({"step": 2, "loss": 2.0})
    assert [m.step for m in load_history(tmp_path / HISTORY_FILE)] == [1, 2]
    assert [m.step for m in resumed.history] == [1, 2]


def test_new_tracker_starts_an_empty_history(tmp_path):
    MetricsTracker(tmp_path).log_metrics({"step": 1, "loss": 3.0})
    MetricsTracker(tmp_path)
    assert (tmp_path / HISTORY_FILE).read_text() == ""


def test_progress_line_shows_reported_fields_only():
    line = log_training_progress(TrainingMetrics(step=7, loss=1.23456, learning_rate=2e-4))
    assert line == "step 7: loss=1.235, learning_rate=0.0002"
