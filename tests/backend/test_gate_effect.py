"""What the gate does where users meet it: through the serving request batcher, on both engines, a forced refusal
is written as the contract's refusal and a forced answer is not; a decision is reported as applied only where a
reply reached the values it holds."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import Collector
from tiny_artifact import tiny_artifact  # noqa: F401

from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.app import gate_report
from kwanzaa_adapter.backend.serving.batching import RequestBatcher
from kwanzaa_adapter.backend.serving.tickets import Ticket
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.data.records import Document
from kwanzaa_adapter.generation.gate import REFUSAL_OPENING, TEXT_KEY
from tests.backend.test_serve_gate import gated_artifact  # noqa: F401

pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")

DOCUMENTS = [Document(title="Kwanzaa", text="Kwanzaa is celebrated from December 26 to January 1.")]


@pytest.fixture(scope="module", params=["reference", "llama.cpp"])
def served(request, gated_artifact, tmp_path_factory):  # noqa: F811
    config, artifact = gated_artifact
    cache = tmp_path_factory.mktemp("gate-effect-cache")
    settings = (f"inference.engine={request.param}", "inference.quant=f16", f"inference.cache_dir={cache}")
    return model_from_config(load_training_config(config, settings), adapter=artifact)


@pytest.mark.parametrize("refuse", [True, False])
def test_a_forced_decision_holds_the_answer_text_on_both_engines(served, refuse):
    gate = dataclasses.replace(served.gate, threshold=-1.0 if refuse else 2.0)  # refuses all / none
    engine = RequestBatcher(served.model, served.tokenizer, gather_s=0, gate=gate, fast=served.fast)
    try:
        ids = served.encode(served.prompt_for("When is Kwanzaa celebrated?", DOCUMENTS), 60)
        ticket = Ticket(ids, 60, Collector(), constraint=served.contract_grammar.constraint(), gated=True)
        engine.submit(ticket)
        text, _, error = ticket.emit.result()
    finally:
        engine.close()
    assert error is None and ticket.gate["decision"] == ("refuse" if refuse else "answer")
    assert TEXT_KEY in text, text  # the reply reached the answer's text: the decision had something to hold
    assert text.split(TEXT_KEY, 1)[1].startswith(REFUSAL_OPENING) == refuse, text
    assert gate_report(ticket.gate, text)["applied"] is True


def test_a_free_text_reply_reports_no_decision():
    decision = {"decision": "refuse", "refuse_probability": 0.9}
    assert gate_report(decision, "Kwanzaa begins on December 26.") == {
        "applied": False, "reason": "the reply is free text, not the answer contract: the gate's decision had "
                                    "nothing to hold"}
    assert gate_report(decision, '{"answer":{"text":"The documents do not') == {"applied": True, **decision}
