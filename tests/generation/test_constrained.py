"""Contract-constrained decoding (llguidance): every generated token stays inside the contract grammar,
in evaluation's batched `generate` and in the serving request batcher; a complete answer parses."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, build_tiny_model
from helpers import Collector, inside_grammar, prompt_ids
from kwanzaa_adapter.backend.serving.batching import RequestBatcher
from kwanzaa_adapter.backend.serving.tickets import Ticket
from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.generation.decoding import generate
from kwanzaa_adapter.generation.grammar import CLIENT_SCHEMA_LIMITS, SchemaGrammar

PROMPTS = [[{"role": "user", "content": q}] for q in ("When is Kwanzaa?", "Who created it?", "What is Kuumba?")]


@pytest.fixture(scope="module")
def grammar(tokenizer) -> SchemaGrammar:
    return SchemaGrammar(tokenizer)


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_model("llama", len(tokenizer), seed=5)


def test_batched_generation_stays_inside_the_contract_only_when_constrained(tiny, tokenizer, grammar):
    free = generate(tiny, tokenizer, PROMPTS, max_new_tokens=24, batch_size=3, progress=False)
    held = generate(tiny, tokenizer, PROMPTS, max_new_tokens=24, batch_size=3, progress=False, grammar=grammar)
    assert not any(inside_grammar(grammar, ids) for ids in free.token_ids)  # a random model writes no JSON
    assert all(inside_grammar(grammar, ids) and ids for ids in held.token_ids)
    assert all(output.startswith('{"version":"kwanzaa.answer.v1"') for output in held.outputs)


def test_every_gold_answer_of_the_eval_split_is_a_complete_sentence_of_the_grammar(tokenizer, grammar):
    # The grammar must admit exactly what training teaches (compact JSON, keys in contract order),
    # or constrained decoding would fight the adapter.
    lines = (ROOT / "data" / "kwanzaa_eval.jsonl").read_text(encoding="utf-8").splitlines()
    answers = [json.loads(line)["messages"][-1]["content"] for line in lines]
    assert len(answers) > 50
    for text in answers:
        constraint = grammar.constraint()
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            constraint.advance(token)
        assert constraint.matcher.is_accepting(), text
        assert parse_answer(text).answer is not None


def test_the_batch_engine_applies_a_constraint_to_its_row_only(tiny, tokenizer, grammar):
    engine = RequestBatcher(tiny, tokenizer, max_batch_size=4, gather_s=0.5)
    held = Ticket(prompt_ids(tokenizer, "When is Kwanzaa?"), 20, Collector(), constraint=grammar.constraint())
    free = Ticket(prompt_ids(tokenizer, "When is Kwanzaa?"), 20, Collector())
    engine.submit(held)
    engine.submit(free)
    held_text, _, _ = held.emit.result()
    free.emit.result()
    engine.close()
    assert inside_grammar(grammar, held.ids) and held_text.startswith('{"version"')
    assert not inside_grammar(grammar, free.ids)


def test_a_client_schema_beyond_the_parser_limits_is_refused_by_llguidance(tokenizer):
    # Small in its grammar per field, large in all: 300 alternatives of 30 patterned fields each.
    schema = {"anyOf": [{"type": "object", "required": [f"p{i}"],
                         "properties": {f"p{j}": {"type": "string", "pattern": f"^x{j}[0-9]{{{j % 9 + 1}}}$"}
                                        for j in range(i, i + 30)}} for i in range(300)]}
    assert SchemaGrammar(tokenizer, schema).constraint() is not None  # llguidance's defaults allow it
    with pytest.raises(ValueError, match="grammar size"):
        SchemaGrammar(tokenizer, schema, CLIENT_SCHEMA_LIMITS)
    assert SchemaGrammar(tokenizer, None, CLIENT_SCHEMA_LIMITS).constraint() is not None  # the contract fits
