"""The baselines every behavioral table shows: the lexical rules, and the base model under the contract's grammar."""

from __future__ import annotations

import json

import pytest

from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.data.records import Document
from kwanzaa_adapter.evaluation.baselines import (
    LexicalBaseline, best_sentence, fit_lexical_baseline, fit_overlap_threshold, question_overlap)
from kwanzaa_adapter.evaluation.eval_set import EvaluationDataError

DOCS = [Document(title="Jazz", source="card", text="Louis Armstrong was born in New Orleans. He moved to Chicago in 1922."),
        Document(title="How Kwanzaa Began", text="Kwanzaa lasts seven days. Maulana Karenga created Kwanzaa in 1966.")]


def test_overlap_is_the_largest_share_of_question_words_one_document_holds():
    assert question_overlap("Who created Kwanzaa in Chicago?", DOCS) == pytest.approx(2 / 3)  # created, kwanzaa
    assert question_overlap("the of and", DOCS) == 0.0


def test_the_answer_is_the_sentence_sharing_most_question_words_the_first_on_ties():
    assert best_sentence("Who created Kwanzaa?", DOCS) == (2, "Maulana Karenga created Kwanzaa in 1966.")
    assert best_sentence("Kwanzaa days created", DOCS)[1] == "Kwanzaa lasts seven days."  # 2 words each: first


def test_the_threshold_makes_the_fewest_errors_the_lowest_on_ties():
    assert fit_overlap_threshold([0.2, 0.4, 0.6, 0.8], [True, True, False, False]) == (0.6, 1.0)
    assert fit_overlap_threshold([0.5, 0.5], [True, False]) == (0.5, 0.5)  # refusing or answering both: one error
    with pytest.raises(ValueError, match="no training examples"):
        fit_overlap_threshold([], [])


def test_the_rules_answer_in_the_contract_citing_the_sentences_document_or_refuse():
    rules = LexicalBaseline(threshold=0.5, train_accuracy=1.0, train_examples=2)
    answered = parse_answer(rules.answer("Who created Kwanzaa?", DOCS)).answer
    assert answered.answer.text == "Maulana Karenga created Kwanzaa in 1966 [2]."
    assert [(s.citation, s.title) for s in answered.sources] == [(2, "How Kwanzaa Began")]
    refused = parse_answer(rules.answer("What did the mayor of Paris eat?", DOCS)).answer
    assert refused.is_refusal and refused.unknowns.missing_context == ["What did the mayor of Paris eat?"]


def record(question: str, refuse: bool) -> dict:
    return {"id": question, "question": question, "documents": [d.model_dump(exclude_none=True) for d in DOCS],
            "expect_refusal": refuse}


def test_the_threshold_is_fitted_on_the_training_files_records_and_dialogues_are_left_out(tmp_path, caplog):
    dialogue = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "{}"}],
                "meta": {"id": "d", "expect_refusal": [False]}}
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in [
        record("Who created Kwanzaa?", False), record("What did the mayor of Paris eat?", True), dialogue]))
    with caplog.at_level("INFO"):
        rules = fit_lexical_baseline(path, "SYS")
    assert (rules.train_examples, rules.train_accuracy) == (2, 1.0)
    assert rules.threshold == 1.0  # the answerable record holds every question word; the other none
    assert any("1 line(s)" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)
    only_dialogue = tmp_path / "dialogues.jsonl"
    only_dialogue.write_text(json.dumps(dialogue) + "\n")
    with pytest.raises(EvaluationDataError, match="no line carries documents"):
        fit_lexical_baseline(only_dialogue, "SYS")
