"""bench/decision.py: the separation scores (AUC, error counts), the lexical baseline and the
teacher-forced refusal probability, checked on hand-made numbers, a shipped record and a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ROOT, load_script
from kwanzaa_adapter.evaluation.eval_set import load_eval_items

BENCH = ROOT / "bench" / "decision.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(BENCH, "bench_decision")


@pytest.fixture(scope="module")
def items():
    return load_eval_items(ROOT / "data" / "kwanzaa_eval_records.jsonl", max_examples=4)


def test_roc_auc_counts_pairs_and_halves_ties(bench):
    # Positives 0.9 and 0.4; negatives 0.5, 0.4 and 0.1. Pairs won: 0.9 beats all three; 0.4 beats
    # 0.1 and ties 0.4. (3 + 1.5) / 6.
    scores = [0.9, 0.5, 0.4, 0.4, 0.1]
    positives = [True, False, True, False, False]
    assert bench.roc_auc(scores, positives) == pytest.approx(4.5 / 6)
    assert bench.roc_auc([0.2, 0.8], [False, True]) == 1.0
    assert bench.roc_auc([0.2, 0.8], [True, False]) == 0.0
    with pytest.raises(ValueError, match="each kind"):
        bench.roc_auc([0.1, 0.2], [True, True])


def test_error_counts_at_a_threshold_and_at_the_best_one(bench):
    scores = [0.9, 0.6, 0.4, 0.3, 0.2]
    positives = [True, False, True, False, False]
    assert bench.errors_at(scores, positives, 0.5) == 2  # 0.6 refused wrongly, 0.4 answered wrongly
    assert bench.errors_at(scores, positives, 0.95) == 2  # nothing refused: the two positives are wrong
    assert bench.fewest_errors(scores, positives) == 1  # threshold 0.3: only 0.6 is wrong
    assert bench.fewest_errors([0.1, 0.9], [True, True]) == 0  # below all scores: everything positive


def test_lexical_score_is_the_best_sentence_share_of_question_words(bench, items):
    item = items[0]
    question, documents = item.example.question, item.example.documents
    score = bench.lexical_score(question, documents)
    assert 0.0 < score <= 1.0
    # One document holding the whole question as a sentence scores 1.
    full = documents[0].model_copy(update={"text": f"Unrelated words here. {question.rstrip('?')}."})
    assert bench.lexical_score(question, [full]) == 1.0
    assert bench.lexical_score("and the of", documents) == 0.0


def test_answer_prefix_stops_at_the_opening_quote_of_the_text(bench, items):
    prefix = bench.answer_prefix(items[0].reference)
    assert prefix.endswith('"answer":{"text":"')
    assert items[0].reference.startswith(prefix)
    with pytest.raises(ValueError, match="text"):
        bench.answer_prefix('{"version":"kwanzaa.answer.v1"}')


def test_refusal_probability_equals_the_product_of_full_forward_token_probabilities(bench, items, tiny_llama,
                                                                                     tokenizer):
    item = items[1]
    opening = bench.DEFAULT_REFUSAL_OPENING
    got = bench.refusal_probability(tiny_llama, tokenizer, item, opening)

    prompt = list(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    prefix = bench.answer_prefix(item.reference)
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + opening, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + full])
    with torch.no_grad():
        log_probs = tiny_llama(input_ids=ids).logits[0].float().log_softmax(-1)
    start = len(prompt) + len(head)
    expected = math.exp(sum(log_probs[p - 1, ids[0, p]].item() for p in range(start, ids.shape[1])))
    assert len(full) > len(head)
    assert 0.0 < got < 1.0
    assert got == pytest.approx(expected, rel=1e-4)



def test_one_scan_gives_each_block_at_both_positions_and_the_refusal_probability(bench, items, tiny_llama,
                                                                                 tokenizer):
    scan = load_script(ROOT / "bench" / "decision_scan.py", "bench_decision_scan")
    opening = bench.DEFAULT_REFUSAL_OPENING
    result = scan.scan(tiny_llama, tokenizer, items, [1, 2], opening, batch_size=3)
    full, head = scan.suffix_ids(tokenizer, opening)
    for index, item in enumerate(items):  # one at a time, unpadded, against the batched scan
        prompt = list(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
        with torch.no_grad():
            hidden = tiny_llama(input_ids=torch.tensor([prompt + full]), output_hidden_states=True).hidden_states
        end, prefix = len(prompt) - 1, len(prompt) + head - 1
        assert result.features[(1, "end")][index] == pytest.approx(hidden[1][0, end].numpy(), abs=1e-4)
        assert result.features[(1, "prefix")][index] == pytest.approx(hidden[1][0, prefix].numpy(), abs=1e-4)
        expected = bench.refusal_probability(tiny_llama, tokenizer, item, opening)
        assert result.refusal_probability[index] == pytest.approx(expected, rel=1e-3)


def test_wrong_decisions_are_counted_by_kind_and_rates_follow_each_items_decision(bench, items):
    expected = [False, True, True]
    wrong = bench.wrong_by_kind([True, False, True], expected, ["answerable", "off_topic", "nearby_detail"])
    assert wrong == {"answered, off_topic": 1, "refused, answer due": 1}
    refusal = ('{"version":"kwanzaa.answer.v1","answer":{"text":"The documents do not say.","confidence":0.1,'
               '"completeness":"insufficient_data"},"sources":[],"unknowns":{"missing_context":["x"]}}')
    chosen = items[:2]
    outputs = {True: [refusal, refusal], False: ["not json", "not json"]}
    rates = bench.picked_rates(chosen, outputs, [True, False])
    assert rates["json_validity_rate"] == 0.5  # the refusal picked for the first, the broken answer for the second
