"""The answerability gate at generation time: it reads its block's output during the prefill, decides
by its threshold, and forces only the decision; the model writes everything else."""

from __future__ import annotations

import pytest
import torch

from conftest import build_tiny_model
from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.generation.decoding import generate
from kwanzaa_adapter.generation.gate import (
    GATE_FILE,
    REFUSAL_OPENING,
    AnswerabilityGate,
    GateError,
    agrees,
    load_gate,
)
from kwanzaa_adapter.generation.grammar import SchemaGrammar

QUESTIONS = ("When is Kwanzaa?", "Who created it?", "What is Kuumba?", "What does the kinara hold?",
             "Which day is Imani?", "What is the karamu?")
PROMPTS = [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def closing_model(tokenizer):
    """A tiny random Llama that closes what it opens: its head favours '"', then ']' and '}', so under
    the contract grammar every answer ends within a few dozen tokens. Which `completeness` it picks
    is its own (random weights)."""
    model = build_tiny_model("llama", len(tokenizer), seed=3)
    bias = torch.zeros(len(tokenizer))
    for token in range(len(tokenizer)):
        text = tokenizer.decode([token])
        if text in ('"', '"]', '"}', '"},'):
            bias[token] = 50.0
        elif text and all(c in "]}" for c in text):
            bias[token] = 40.0
        elif text == "0":
            bias[token] = 20.0
    model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


@pytest.fixture(scope="module")
def grammar(tokenizer):
    return SchemaGrammar(tokenizer)


def answers(result) -> list:
    parsed = [parse_answer(output).answer for output in result.outputs]
    assert all(answer is not None for answer in parsed), result.outputs
    return parsed


def test_forced_refusals_are_contract_refusals_and_forced_answers_are_none(closing_model, tokenizer, grammar):
    options = dict(max_new_tokens=96, batch_size=3, progress=False, grammar=grammar)
    own = answers(generate(closing_model, tokenizer, PROMPTS, **options))
    refused = generate(closing_model, tokenizer, PROMPTS, forced=[True] * len(PROMPTS), **options)
    answered = generate(closing_model, tokenizer, PROMPTS, forced=[False] * len(PROMPTS), **options)
    assert refused.refuse == [True] * len(PROMPTS) and answered.refuse == [False] * len(PROMPTS)
    for answer in answers(refused):
        assert answer.is_refusal and answer.answer.text.startswith(REFUSAL_OPENING)
        # What follows the forced words is the model's: here, at once, the closing quote.
        assert answer.answer.text == REFUSAL_OPENING
    assert not any(answer.is_refusal for answer in answers(answered))
    assert all(a.answer.completeness in ("complete", "partial") for a in answers(answered))
    # Left to itself this model refuses: forcing "answer" changed every decision.
    assert all(answer.is_refusal for answer in own)


def block_outputs(model, tokenizer, layer: int) -> torch.Tensor:
    """Block `layer`'s output at each prompt's last token, one unpadded prompt at a time."""
    rows = []
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_tensors="pt")
        ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        rows.append(hidden[0, -1])
    return torch.stack(rows)


def test_the_gate_reads_its_block_in_the_prefill_and_decides_by_its_threshold(closing_model, tokenizer, grammar):
    features = block_outputs(closing_model, tokenizer, layer=1)
    weight = torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0))
    expected = torch.sigmoid(features @ weight)
    threshold = float(expected.median())
    gate = AnswerabilityGate(1, threshold, weight, torch.zeros(1), torch.zeros_like(weight), torch.ones_like(weight))
    result = generate(closing_model, tokenizer, PROMPTS, max_new_tokens=96, batch_size=3, progress=False,
                      grammar=grammar, gate=gate)
    assert result.refuse_probabilities == pytest.approx(expected.tolist(), abs=1e-3)
    decided = [p > threshold for p in expected.tolist()]
    assert result.refuse == decided
    assert True in decided and False in decided  # a gate with no weights would decide alike for every prompt
    assert [a.is_refusal for a in answers(result)] == decided


def test_text_that_leaves_the_decision_is_vetoed_and_text_on_it_is_not():
    opening = '{"version":"kwanzaa.answer.v1","answer":{"text":"'
    assert agrees(opening + "The documents do", refuse=True)
    assert agrees(opening + "The documents do not say when", refuse=True)
    assert not agrees(opening + "Kwanzaa", refuse=True)
    assert agrees(opening + "Kwanzaa", refuse=False) and agrees(opening + "The first", refuse=False)
    assert not agrees(opening + "The documents do not", refuse=False)
    assert not agrees(opening + "The document does not say", refuse=False)
    refused = opening + 'The documents do not say.","confidence":0.1,"completeness":"'
    assert agrees(refused + "insuff", refuse=True) and not agrees(refused + "complete", refuse=True)
    answered = opening + 'Karenga [1].","confidence":0.9,"completeness":"'
    assert agrees(answered + "partial", refuse=False) and not agrees(answered + "insufficient_data", refuse=False)
    assert not agrees(answered + "na", refuse=False)  # not a value of the contract: no way out of the answer
    assert agrees('{"version":"kwan', refuse=True)  # nothing decided yet


def test_a_gate_file_round_trips_and_a_damaged_one_is_named(tmp_path):
    weight = torch.arange(4, dtype=torch.float32)
    gate = AnswerabilityGate(3, 0.42, weight, torch.tensor([0.5]), torch.ones(4), torch.full((4,), 2.0),
                             {"calibration_auc": 0.9})
    gate.save(tmp_path / GATE_FILE)
    loaded = load_gate(tmp_path)
    assert (loaded.layer, loaded.threshold, loaded.info) == (3, 0.42, {"calibration_auc": 0.9})
    assert torch.equal(loaded.weight, weight) and torch.equal(loaded.scale, gate.scale)
    assert load_gate(tmp_path / "nowhere") is None
    (tmp_path / GATE_FILE).write_bytes((tmp_path / GATE_FILE).read_bytes()[:40])
    with pytest.raises(GateError, match=GATE_FILE):
        load_gate(tmp_path)
