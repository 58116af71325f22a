"""The backend on the fast engine: nothing derived from an unverified artifact; answers, chat, serving
batches and the GGUF export on the tiny 4-bit artifact, against the reference path."""

from __future__ import annotations

import json
import queue

import pytest
from helpers import Collector, prompt_ids
from tiny_artifact import copy_artifact, flip_last_byte, tiny_artifact  # noqa: F401

from kwanzaa_adapter.backend.gguf_export import GGUF_REQUIRED, export_gguf
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.batching import RequestBatcher
from kwanzaa_adapter.backend.serving.tickets import Ticket
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.data.records import Document
from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine
from kwanzaa_adapter.modeling.derived import GGUF_FILE
from kwanzaa_adapter.modeling.loading import AdapterVerificationError
from kwanzaa_adapter.safety.artifacts import verify_artifact

pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")

DOCUMENTS = [Document(title="Kwanzaa", text="Kwanzaa is celebrated from December 26 to January 1.")]
QUESTIONS = ["When is Kwanzaa celebrated?", "What does ujima mean?", "Who designed the first kinara?"]


def _load(config_path, artifact, cache, engine: str):
    config = load_training_config(config_path, (f"inference.engine={engine}", "inference.quant=f16",
                                                f"inference.cache_dir={cache}"))
    return model_from_config(config, adapter=artifact)


@pytest.fixture(scope="module")
def both(tiny_artifact, tmp_path_factory):  # noqa: F811
    config, artifact = tiny_artifact
    cache = tmp_path_factory.mktemp("fast-backend-cache")
    return _load(config, artifact, cache, "reference"), _load(config, artifact, cache, "llama.cpp")


def test_an_unverified_artifact_is_refused_before_anything_is_derived(tiny_artifact, tmp_path):  # noqa: F811
    config, artifact = tiny_artifact
    tampered = copy_artifact(artifact, tmp_path / "tampered")
    flip_last_byte(tampered / "adapter_model.safetensors")
    with pytest.raises(AdapterVerificationError, match="refusing to load"):
        _load(config, tampered, tmp_path / "cache", "llama.cpp")
    assert not (tmp_path / "cache").exists()  # nothing built, nothing cached


def test_the_fast_backend_answers_as_the_reference_does(both):
    reference, fast = both
    assert reference.fast is None and reference.describe()["engine"]["engine"] == "reference"
    assert fast.describe()["engine"]["engine"] == "llama.cpp (f16)"
    assert fast.describe()["engine"]["derived"]["derives_from"]["base_digest"] == fast.base_digest
    prompts = [fast.prompt_for(question, DOCUMENTS) for question in QUESTIONS]
    expected = [a.raw_output for a in reference.answer_prompts(prompts, max_new_tokens=12, constrained=True)]
    assert [a.raw_output for a in fast.answer_prompts(prompts, max_new_tokens=12, constrained=True)] == expected


def test_chat_streams_the_reference_reply(both):
    reference, fast = both
    messages = [{"role": "user", "content": "Tell me about Kwanzaa."}]
    replies = []
    for model in both:
        stream = model.stream_chat(messages, max_new_tokens=10)
        pieces = list(stream)
        assert "".join(pieces) == stream.text and stream.completion_tokens >= 1
        replies.append((stream.text, stream.finish_reason))
    assert replies[0] == replies[1]


def test_serving_batches_on_the_fast_engine_equal_the_reference(both, tokenizer):
    reference, fast = both
    limits = [9, 4, 12]
    outcomes = []
    for model in both:
        engine = RequestBatcher(model.model, model.tokenizer, max_batch_size=8, gather_s=0.3, fast=model.fast)
        tickets = [Ticket(prompt_ids(tokenizer, q), n, Collector()) for q, n in zip(QUESTIONS, limits)]
        for ticket in tickets:
            engine.submit(ticket)
        outcomes.append([(ticket.emit.result(), ticket.ids, ticket.finish_reason) for ticket in tickets])
        engine.close()
    assert outcomes[0] == outcomes[1]
    for (text, ids, reason), limit in zip(outcomes[1], limits):
        assert len(ids) <= limit and reason == ("length" if len(ids) == limit else "stop")


def test_requests_that_arrive_during_a_fast_batch_join_it_and_answer_as_they_do_alone(both, tokenizer):
    """Continuous batching: a request submitted while a batch decodes starts at its next step (one batch
    run, not two) and gets the answer it gets alone; a prompt too long for the running context waits for
    the next batch, and the short one behind it is not let pass."""
    _, fast = both
    # An engine of its own: its context is sized by this test's prompts only.
    engine = RequestBatcher(fast.model, fast.tokenizer, max_batch_size=4, gather_s=0, fast=LlamaCppEngine(fast.fast.path))
    runs = queue.Queue()  # the size of each batch run, as it ends
    engine.on_batch = lambda tickets, seconds: runs.put(len(tickets))
    long_question = "Tell me, with every detail the documents hold, " * 6 + QUESTIONS[2]
    asked = {question: prompt_ids(tokenizer, question) for question in (*QUESTIONS, long_question)}

    def answer(question: str, limit: int, arrivals: tuple[str, ...] = ()) -> tuple[list[Ticket], list[int]]:
        """`question` alone, or with `arrivals` submitted when its second token has been emitted: the tickets,
        and the sizes of the batch runs that answered them (each run ends after its tickets' last events)."""
        later = [Ticket(asked[q], 12, Collector()) for q in arrivals]
        collector = Collector()

        def emit(event) -> None:
            collector(event)
            if event.kind == "delta" and len(first.ids) == 2:
                for ticket in later:
                    engine.submit(ticket)

        first = Ticket(asked[question], limit, emit)
        engine.submit(first)
        collector.result()
        for ticket in later:
            ticket.emit.result()
        sizes = [runs.get(timeout=60)]
        while sum(sizes) < 1 + len(later):
            sizes.append(runs.get(timeout=60))
        return [first, *later], sizes

    alone = {q: answer(q, 40 if q == QUESTIONS[0] else 12) for q in QUESTIONS}
    assert all(sizes == [1] for _, sizes in alone.values())
    (first, joined), sizes = answer(QUESTIONS[0], 40, (QUESTIONS[1],))
    assert sizes == [2] and joined.started_at > first.first_token_at  # it joined the running batch
    assert (first.ids, joined.ids) == (alone[QUESTIONS[0]][0][0].ids, alone[QUESTIONS[1]][0][0].ids)
    assert len(first.ids) == 40 and len(joined.ids) == 12
    # The context is sized for the short prompts seen so far (it only grows): the long one does not fit.
    (first, too_long, behind), sizes = answer(QUESTIONS[0], 40, (long_question, QUESTIONS[2]))
    assert sizes == [1, 2]  # the long one waited for the next batch, and the short one behind it too
    assert behind.ids == alone[QUESTIONS[2]][0][0].ids
    assert too_long.ids == answer(long_question, 12)[0][0].ids
    engine.close()


def test_gguf_export_is_sealed_loads_in_llamacpp_and_matches_the_trained_model(tiny_artifact, tmp_path,  # noqa: F811
                                                                                 capsys):
    config, artifact = tiny_artifact
    out = tmp_path / "gguf"
    code = main(["export", "--config", str(config), "--adapter", str(artifact), "--merge", str(out),
                 "--format", "gguf", "--quant", "f16"])
    assert code == 0
    assert "passed" in capsys.readouterr().out
    assert verify_artifact(out, required_files=GGUF_REQUIRED).ok
    check = json.loads((out / "gguf_logit_check.json").read_text())
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"]
    engine = LlamaCppEngine(out / GGUF_FILE)  # llama.cpp itself loads the file and answers
    assert engine.prompt_logits([1, 2, 3]).shape[0] == 3
    card = (out / "README.md").read_text()
    assert "f16" in card
    flip_last_byte(out / GGUF_FILE)
    assert not verify_artifact(out, required_files=GGUF_REQUIRED).ok


def test_gguf_export_refuses_an_existing_directory_and_an_unverified_artifact(tiny_artifact, tmp_path):  # noqa: F811
    config, artifact = tiny_artifact
    tampered = copy_artifact(artifact, tmp_path / "tampered")
    flip_last_byte(tampered / "adapter_model.safetensors")
    with pytest.raises(AdapterVerificationError):
        export_gguf(tampered, tmp_path / "out", load_training_config(config, ()), quant="f16")
    assert not (tmp_path / "out").exists()
    code = main(["export", "--config", str(config), "--adapter", str(tampered), "--merge", str(tmp_path / "o2"),
                 "--format", "gguf"])
    assert code == 1 and not (tmp_path / "o2").exists()


def test_gated_serving_batches_on_the_fast_engine_decide_as_the_reference(both, tokenizer):
    import torch

    from kwanzaa_adapter.generation.gate import AnswerabilityGate, prompt_features

    reference, fast = both
    ids = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    features = prompt_features(reference.model, tokenizer, ids, [1])[1]
    torch.manual_seed(5)
    gate = AnswerabilityGate(1, 0.5, torch.randn(features.shape[1]), torch.zeros(1), features.mean(0),
                             features.std(0) + 1e-3)
    outcomes = []
    for model, engine in ((reference, None), (fast, LlamaCppEngine(fast.fast.path, gate_layer=1))):
        batcher = RequestBatcher(model.model, model.tokenizer, max_batch_size=8, gather_s=0.3, gate=gate, fast=engine)
        tickets = [Ticket(i, 10, Collector(), gated=n != 1) for n, i in enumerate(ids)]  # the second ungated
        for ticket in tickets:
            batcher.submit(ticket)
        outcomes.append([(ticket.emit.result()[0], ticket.ids, ticket.gate and ticket.gate["decision"])
                         for ticket in tickets])
        batcher.close()
    assert outcomes[0] == outcomes[1]
    assert outcomes[1][1][2] is None and all(o[2] in ("answer", "refuse") for o in outcomes[1][::2])
