"""What the model reads (the question's attention to each sentence), the evidence selector over it, and the
grounding check, on tiny models and hand-made answers."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.data.records import Document, RagRecord, render_record
from kwanzaa_adapter.generation.evidence import (
    EVIDENCE_FILE, Candidate, Evidence, EvidenceError, EvidenceSelector, candidates, finish_answer, hold_to_evidence,
    load_evidence_selector, reading_features)
from kwanzaa_adapter.generation.grounding import check_grounding
from kwanzaa_adapter.generation.gate import prompt_features
from kwanzaa_adapter.generation.reading import read_prompt, read_prompts

JAZZ = Document(title="Louis Armstrong", source="reading card", text="Louis Armstrong was born in New Orleans in 1901. "
                "In 1922 he moved to Chicago to join King Oliver.")
ORIGIN = Document(title="How Kwanzaa Began", text="Maulana Karenga created Kwanzaa in 1966. It lasts seven days.")
DOCS = [JAZZ, ORIGIN]
QUESTION = "Who created Kwanzaa?"


def prompt(question: str = QUESTION, documents=DOCS) -> list[dict]:
    return render_record(RagRecord(id="q", question=question, documents=documents, expect_refusal=False))


def answer(text: str, cited=(), completeness: str = "complete") -> str:
    return json.dumps({"version": "kwanzaa.answer.v1",
                       "answer": {"text": text, "confidence": 0.9, "completeness": completeness},
                       "sources": [{"citation": n, "title": DOCS[n - 1].title} for n in cited],
                       "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []}})


ORIGIN_FIRST = Evidence((Candidate(2, 0, "Maulana Karenga created Kwanzaa in 1966."),), (0.9,))


# --------------------------------------------------------------------------- reading


def test_every_sentence_is_a_candidate_and_its_tokens_are_found_in_the_prompt(tokenizer):
    found = candidates(DOCS)
    assert [(c.document, c.index) for c in found] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    read = read_prompt(tokenizer, prompt(), [(DOCS[c.document - 1].text, c.sentence) for c in found])
    for candidate, span in zip(found, read.sentences):
        assert tokenizer.decode([read.ids[i] for i in span]).strip() == candidate.sentence
    assert tokenizer.decode([read.ids[i] for i in read.question]).strip().startswith(QUESTION)


def eager_question_attention(model, ids: list[int], question: list[int]) -> torch.Tensor:
    """The reference: eager attention's own probabilities, averaged over the question rows."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    return torch.stack([layer[0][:, question, :].mean(dim=1) for layer in attentions])  # blocks x heads x keys


def test_the_tap_reads_the_attention_eager_attention_computes_and_changes_no_output(tokenizer):
    model = build_tiny_model("llama", len(tokenizer), seed=3)
    questions = [QUESTION, "Where was Louis Armstrong born, and when did he go to Chicago?"]
    reads = [read_prompt(tokenizer, prompt(q), [(DOCS[c.document - 1].text, c.sentence) for c in candidates(DOCS)])
             for q in questions]
    with torch.no_grad():
        before = model(input_ids=torch.tensor([reads[0].ids])).logits
    reading = read_prompts(model, tokenizer, reads, depth=2, layers=[1, 2], batch_size=2)  # one left-padded batch
    # The same pass gives the gate its block outputs, as the gate's own reading of them.
    gate_features = prompt_features(model, tokenizer, [r.ids for r in reads], [1, 2])
    for layer in (1, 2):
        torch.testing.assert_close(reading.block_outputs[layer], gate_features[layer], atol=1e-5, rtol=1e-4)
    for read, mass in zip(reads, reading.attention):
        expected = eager_question_attention(model, read.ids, read.question)
        sums = torch.stack([expected[:, :, span].sum(-1).flatten() for span in read.sentences])
        assert mass.shape == (4, 2 * 4)  # sentences x (blocks * heads)
        torch.testing.assert_close(mass, sums, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor([reads[0].ids])).logits, before)
    assert model.config._attn_implementation == "sdpa"  # restored after the pass


# --------------------------------------------------------------------------- the selector


def selector_for(width: int, favoured: int, depth: int = 2, second: float = 1.01) -> EvidenceSelector:
    weight = torch.zeros(width)
    weight[favoured] = 3.0
    return EvidenceSelector(depth, second, weight, torch.zeros(1), torch.zeros(width), torch.ones(width),
                            {"note": "hand-made"})


def test_the_selector_chooses_the_best_scored_sentence_and_refuses_another_models_width():
    found = candidates(DOCS)
    features = torch.tensor([[0.0, 1.0], [0.0, 0.5], [0.0, 2.0], [0.0, -1.0]])
    evidence = selector_for(2, favoured=1).choose(found, features)
    assert evidence.chosen == (found[2],) and evidence.probabilities == (pytest.approx(0.9975, abs=1e-4),)
    # A runner-up at or above the `second` threshold joins the best, in document order.
    two = selector_for(2, favoured=1, second=0.9).choose(found, features)  # P(found[0]) = sigmoid(3) = 0.953
    assert two.chosen == (found[0], found[2]) and two.best == found[2]
    assert selector_for(2, 1).choose([], torch.zeros(0, 2)) is None
    with pytest.raises(EvidenceError, match="fitted on another model"):
        selector_for(3, 1).choose(found, features)


def test_the_selector_reads_a_tiny_model_and_picks_one_sentence_per_prompt(tokenizer):
    model = build_tiny_model("llama", len(tokenizer), seed=4)
    ((found, features),) = reading_features(model, tokenizer, [prompt()], [DOCS], depth=2)
    assert features.shape == (4, 8) and torch.isfinite(features).all()
    ((_, first_block),) = reading_features(model, tokenizer, [prompt()], [DOCS], depth=1)  # stops after block 1
    torch.testing.assert_close(first_block, features[:, :4])
    (evidence,) = selector_for(8, favoured=0).select(model, tokenizer, [prompt()], [DOCS])
    assert evidence.chosen == (found[int(torch.argmax(features[:, 0]))],)


def test_the_selector_round_trips_through_its_file_and_a_wrong_file_is_refused(tmp_path):
    selector = selector_for(8, favoured=2)
    selector.save(tmp_path / EVIDENCE_FILE)
    loaded = load_evidence_selector(tmp_path)
    assert torch.equal(loaded.weight, selector.weight) and loaded.info == {"note": "hand-made"}
    assert (loaded.depth, loaded.second) == (2, 1.01)
    assert load_evidence_selector(tmp_path / "none") is None
    (tmp_path / EVIDENCE_FILE).write_bytes(b"\0" * 64)
    with pytest.raises(EvidenceError, match="not an evidence-selector file"):
        load_evidence_selector(tmp_path)


# --------------------------------------------------------------------------- applying it


def test_holding_writes_the_evidence_as_the_text_cited_to_its_document():
    drifted = answer("Louis Armstrong created Kwanzaa in 1901 [1].", [1])
    held = parse_answer(hold_to_evidence(drifted, DOCS, ORIGIN_FIRST, "hold")).answer
    assert held.answer.text == "Maulana Karenga created Kwanzaa in 1966 [2]."
    assert [(s.citation, s.title) for s in held.sources] == [(2, "How Kwanzaa Began")]


def test_holding_two_sentences_cites_each_to_its_own_document():
    both = Evidence((Candidate(1, 1, "In 1922 he moved to Chicago to join King Oliver."),
                     Candidate(2, 0, "Maulana Karenga created Kwanzaa in 1966.")), (0.4, 0.8))
    held = parse_answer(hold_to_evidence(answer("Something [1].", [1]), DOCS, both, "hold")).answer
    assert held.answer.text == ("In 1922 he moved to Chicago to join King Oliver [1]. "
                                "Maulana Karenga created Kwanzaa in 1966 [2].")
    assert [s.citation for s in held.sources] == [1, 2] and both.best.document == 2


def test_citing_moves_every_marker_to_the_evidence_and_keeps_the_models_words():
    drifted = answer("Karenga created it in 1966 [1] and it lasts a week [1].", [1])
    cited = parse_answer(hold_to_evidence(drifted, DOCS, ORIGIN_FIRST, "cite")).answer
    assert cited.answer.text == "Karenga created it in 1966 [2] and it lasts a week [2]."
    assert [s.citation for s in cited.sources] == [2]


@pytest.mark.parametrize("output", [answer("The documents do not say.", completeness="insufficient_data"), "not json"])
def test_refusals_and_invalid_outputs_are_left_as_they_are(output):
    for mode in ("cite", "hold"):
        assert hold_to_evidence(output, DOCS, ORIGIN_FIRST, mode) == output
    assert check_grounding(output, DOCS) == output


def test_a_sentence_no_document_supports_leaves_the_text_for_unsupported_claims():
    output = answer("Maulana Karenga created Kwanzaa in 1966 [2]. The moon landing inspired its colors [2].", [2])
    checked = parse_answer(check_grounding(output, DOCS)).answer
    assert checked.answer.text == "Maulana Karenga created Kwanzaa in 1966 [2]."
    assert checked.unknowns.unsupported_claims == ["The moon landing inspired its colors."]


def test_a_citation_to_a_document_that_does_not_support_its_sentence_moves_to_the_one_that_does():
    output = answer("Louis Armstrong moved to Chicago in 1922 [2].", [2])
    checked = parse_answer(check_grounding(output, DOCS)).answer
    assert checked.answer.text == "Louis Armstrong moved to Chicago in 1922 [1]."
    assert [(s.citation, s.title, s.source) for s in checked.sources] == [(1, "Louis Armstrong", "reading card")]
    uncited = parse_answer(check_grounding(answer("Karenga created Kwanzaa in 1966."), DOCS)).answer
    assert uncited.answer.text == "Karenga created Kwanzaa in 1966 [2]."


def test_an_answer_with_nothing_supported_becomes_a_refusal_that_keeps_its_claims():
    checked = parse_answer(check_grounding(answer("Zebras painted the Sistine Chapel [1].", [1]), DOCS)).answer
    assert checked.is_refusal
    assert checked.unknowns.unsupported_claims == ["Zebras painted the Sistine Chapel."]


def test_finishing_applies_the_evidence_then_the_check_and_nothing_when_off():
    drifted = answer("Louis Armstrong created Kwanzaa in 1901 [1].", [1])
    assert finish_answer(drifted, DOCS) == drifted
    assert finish_answer(drifted, DOCS, evidence=ORIGIN_FIRST, mode="none") == drifted
    held = finish_answer(drifted, DOCS, evidence=ORIGIN_FIRST, mode="hold", grounding=True)
    assert parse_answer(held).answer.answer.text == "Maulana Karenga created Kwanzaa in 1966 [2]."
