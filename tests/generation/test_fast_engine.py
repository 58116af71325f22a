"""The fast engine (llama.cpp on a derived GGUF) against the reference path, on tiny random models.

The tiny models' logits are small and close together (about 0.8 at most), so greedy tokens are a
sharp test: a merge without the LoRA delta, or a wrong layer for the gate, shows at once.
"""

from __future__ import annotations

import json

import pytest
import torch

from kwanzaa_adapter.backend.gguf_export import GGUF_TOLERANCE
from kwanzaa_adapter.generation.decoding import generate, request_sampler
from kwanzaa_adapter.generation.gate import AnswerabilityGate, prompt_features
from kwanzaa_adapter.generation.grammar import SchemaGrammar
from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine, Row
from kwanzaa_adapter.generation.prefixes import copied_tokens
from kwanzaa_adapter.modeling.derived import DERIVED_RECORD, GGUF_FILE, derived_gguf
from tests.conftest import build_tiny_model

pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")

QUESTIONS = ["When is Kwanzaa celebrated?", "What does ujima mean?", "Who lit the first kinara candle?"]


def _adapted(tokenizer, kind: str = "llama"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    base = build_tiny_model(kind, len(tokenizer))
    # Random A and B: a delta large enough to move the tiny model's greedy tokens.
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False)).eval()


def _prompts():
    return [[{"role": "user", "content": question}] for question in QUESTIONS]


def _ids(tokenizer, prompt) -> list[int]:
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])


@pytest.fixture(scope="module")
def adapted(tokenizer):
    return _adapted(tokenizer)


@pytest.fixture(scope="module")
def merged_f16(adapted, tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("fast-cache")
    path, _ = derived_gguf(adapted, tokenizer, base_digest="tiny", with_adapter=True, quant="f16", cache_dir=cache)
    return path


def test_fast_engine_decodes_the_reference_tokens_in_batches(adapted, tokenizer, merged_f16):
    engine = LlamaCppEngine(merged_f16)
    settings = dict(max_new_tokens=16, batch_size=2, progress=False)
    reference = generate(adapted, tokenizer, _prompts(), **settings)
    fast = generate(adapted, tokenizer, _prompts(), **settings, llamacpp=engine)
    assert fast.token_ids == reference.token_ids
    assert fast.outputs == reference.outputs and fast.new_tokens == reference.new_tokens


def test_grammar_forbids_the_greedy_token_on_the_fast_engine(adapted, tokenizer, merged_f16):
    engine = LlamaCppEngine(merged_f16)
    grammar = SchemaGrammar(tokenizer)
    prompt = _ids(tokenizer, _prompts()[0])
    free = engine.prompt_logits(prompt)[-1]
    greedy = int(free.argmax())
    allowed = grammar.constraint().allowed(free.shape[-1])
    assert not allowed[greedy], "the tiny model's greedy first token must be one the contract forbids"
    held = engine.generate(tokenizer, [prompt], max_new_tokens=16, batch_size=1, stop_ids=[tokenizer.eos_token_id],
                           progress=False, grammar=grammar)
    first = held.token_ids[0][0]
    assert first != greedy and allowed[first]
    assert first == int(free.masked_fill(~allowed, float("-inf")).argmax())  # the best token the grammar allows
    assert held.outputs[0].startswith('{"version":"kwanzaa.answer.v1"')


def test_gate_features_come_from_the_engine_and_match_the_reference(adapted, tokenizer, merged_f16):
    ids = [_ids(tokenizer, prompt) for prompt in _prompts()]
    for layer in (1, 2):  # a middle block, and the last (whose output llama.cpp keeps for the last token only)
        features = prompt_features(adapted, tokenizer, ids, [layer])[layer]
        torch.manual_seed(layer)
        gate = AnswerabilityGate(layer, 0.5, torch.randn(features.shape[1]), torch.zeros(1), features.mean(0),
                                 features.std(0) + 1e-3)
        reference = generate(adapted, tokenizer, _prompts(), max_new_tokens=6, batch_size=3, progress=False, gate=gate)
        fast = generate(adapted, tokenizer, _prompts(), max_new_tokens=6, batch_size=3, progress=False, gate=gate,
                        llamacpp=LlamaCppEngine(merged_f16, gate_layer=layer))
        assert fast.refuse == reference.refuse
        assert fast.refuse_probabilities == pytest.approx(reference.refuse_probabilities, abs=0.02)
        with pytest.raises(ValueError, match="without a tap"):
            generate(adapted, tokenizer, _prompts(), max_new_tokens=2, batch_size=3, progress=False, gate=gate,
                     llamacpp=LlamaCppEngine(merged_f16, gate_layer=3 - layer))


def _versus_reference(model, tokenizer, gguf) -> tuple[float, float, float, bool]:
    """(max |logit difference|, its tolerance for f16, share of positions with the same greedy token, whether
    16 greedy tokens decoded by both are the same) on one prompt."""
    prompt = _ids(tokenizer, _prompts()[1])
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([prompt])).logits[0]
    engine = LlamaCppEngine(gguf)
    fast = engine.prompt_logits(prompt)[:, : reference.shape[-1]]
    settings = dict(max_new_tokens=16, batch_size=1, progress=False)
    same_tokens = (generate(model, tokenizer, _prompts()[1:2], **settings).token_ids
                   == generate(model, tokenizer, _prompts()[1:2], **settings, llamacpp=engine).token_ids)
    return (float((fast - reference).abs().max()), GGUF_TOLERANCE["f16"] * float(reference.abs().max()),
            float((fast.argmax(-1) == reference.argmax(-1)).float().mean()), same_tokens)


def test_a_merge_without_the_lora_delta_fails_logits_and_greedy_tokens(adapted, tokenizer, merged_f16, tmp_path):
    diff, tolerance, agreement, same_tokens = _versus_reference(adapted, tokenizer, merged_f16)
    assert diff <= tolerance and agreement >= 0.9 and same_tokens
    without, _ = derived_gguf(adapted, tokenizer, base_digest="tiny", with_adapter=False, quant="f16",
                              cache_dir=tmp_path)
    diff, tolerance, agreement, same_tokens = _versus_reference(adapted, tokenizer, without)
    assert diff > tolerance and agreement < 0.5 and not same_tokens


def test_a_cached_model_that_does_not_match_its_record_is_rebuilt(adapted, tokenizer, tmp_path, caplog):
    options = dict(base_digest="tiny", with_adapter=True, quant="f16", cache_dir=tmp_path)
    path, record = derived_gguf(adapted, tokenizer, **options)
    assert derived_gguf(adapted, tokenizer, **options)[0] == path  # a match: used as it is

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        rebuilt, again = derived_gguf(adapted, tokenizer, **options)
    assert "does not have the sha256" in caplog.text
    assert again["gguf_sha256"] == record["gguf_sha256"] and rebuilt.read_bytes() != bytes(data)

    stored = json.loads((path.parent / DERIVED_RECORD).read_text())
    stored["derives_from"]["base_digest"] = "another base"
    (path.parent / DERIVED_RECORD).write_text(json.dumps(stored))
    caplog.clear()
    with caplog.at_level("WARNING"):
        derived_gguf(adapted, tokenizer, **options)
    assert "it derives from" in caplog.text
    assert json.loads((path.parent / DERIVED_RECORD).read_text())["derives_from"]["base_digest"] == "tiny"
    assert (path.parent / GGUF_FILE).is_file()


def test_the_olmo_profile_converts_and_matches(tokenizer, tmp_path):
    olmo = _adapted(tokenizer, "olmo")
    path, _ = derived_gguf(olmo, tokenizer, base_digest="tiny-olmo", with_adapter=True, quant="f16", cache_dir=tmp_path)
    diff, tolerance, agreement, same_tokens = _versus_reference(olmo, tokenizer, path)
    assert diff <= tolerance and agreement >= 0.9 and same_tokens


def test_one_prompt_gated_and_not_decodes_once_and_parts_where_the_gate_holds(adapted, tokenizer, merged_f16):
    ids = [_ids(tokenizer, prompt) for prompt in _prompts()]
    features = prompt_features(adapted, tokenizer, ids, [1])[1]
    # A gate that refuses every prompt: the held rows must part from the free ones at the answer's text.
    gate = AnswerabilityGate(1, -1.0, torch.zeros(features.shape[1]), torch.ones(1), features.mean(0),
                             features.std(0) + 1e-3)
    engine = LlamaCppEngine(merged_f16, gate_layer=1)
    grammar = SchemaGrammar(tokenizer)
    settings = dict(max_new_tokens=40, stop_ids=[tokenizer.eos_token_id], progress=False, grammar=grammar)
    free = engine.generate(tokenizer, ids, batch_size=3, **settings)
    held = engine.generate(tokenizer, ids, batch_size=3, gate=gate, **settings)
    together = engine.generate(tokenizer, ids + ids, batch_size=6, gate=gate, gated=[False] * 3 + [True] * 3, **settings)
    assert together.token_ids == free.token_ids + held.token_ids
    assert together.refuse[3:] == held.refuse == [True] * 3
    assert free.token_ids != held.token_ids  # they did part
    assert all('"text":"The documents do not' in output for output in held.outputs)


def test_sampled_rows_of_one_prompt_each_decode_on_their_own_sequence(adapted, tokenizer, merged_f16):
    """Every step's scores of a sampled row are those it has alone, whatever rows of the same prompt (sampled,
    greedy, ending at once) decode beside it: each sampled row gets a KV sequence of its own."""
    engine = LlamaCppEngine(merged_f16)
    prompt, other = (_ids(tokenizer, prompt) for prompt in _prompts()[:2])

    def row(seed: int | None, ids: list[int] = prompt, limit: int = 12, seen: list | None = None) -> Row:
        draw = request_sampler(1.0, 1.0, seed) if seed is not None else None
        sample = (lambda scores: seen.append(scores.clone()) or draw(scores)) if seen is not None else draw
        return Row(ids, limit, sample=sample, json_only=False)

    def scores_of(rows: list[Row], seen: list) -> tuple[list, list[int]]:
        for _ in engine.decode(tokenizer, rows, [tokenizer.eos_token_id]):
            pass
        return seen, rows[0].tokens

    alone, tokens = scores_of([row(1234, seen=(seen := []))], seen)
    for company in ([row(7)], [row(None)], [row(7, limit=1)], [row(7), row(None), row(5, other)]):
        together, beside = scores_of([row(1234, seen=(seen := [])), *company], seen)
        assert beside == tokens and len(together) == len(alone) == 12
        # Batched products round differently from a row alone: up to 2.5e-4 with llama.cpp's AVX2 build
        # (1e-4 held on the AVX-512 one); a row reading another's KV moves its scores by whole units.
        assert max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True)) < 1e-3


def test_prompts_that_begin_alike_prefill_the_beginning_once_and_decode_as_they_do_alone(adapted, tokenizer, merged_f16):
    """Questions asked of the same documents start from a copy of the KV of the first one pre-filled:
    fewer tokens computed, and every step's scores, tokens and gate probability those of the prompt alone."""
    documents = "Documents:\n" + "\n".join(f"[{n}] {text}" for n, text in enumerate(
        ["Kwanzaa runs from December 26 to January 1.", "Its seven principles are the Nguzo Saba.",
         "Maulana Karenga first held it in 1966."], start=1))
    prompts = [_ids(tokenizer, [{"role": "user", "content": f"{documents}\n\nQuestion: {question}"}])
               for question in QUESTIONS] + [_ids(tokenizer, _prompts()[0])]
    features = prompt_features(adapted, tokenizer, prompts, [1])[1]
    # Features scaled by their overall size, not per dimension: the questions' features are close together.
    gate = AnswerabilityGate(1, 0.5, torch.randn(features.shape[1], generator=torch.Generator().manual_seed(0)),
                             torch.zeros(1), features.mean(0), features.std() * torch.ones(features.shape[1]))
    engine = LlamaCppEngine(merged_f16, gate_layer=1)

    def run(batch: list[list[int]]) -> tuple[list[list[torch.Tensor]], list[Row]]:
        seen = [[] for _ in batch]
        rows = [Row(ids, 8, gated=True, sample=lambda scores, mine=mine: mine.append(scores) or int(scores.argmax()),
                    json_only=False) for ids, mine in zip(batch, seen)]
        for _ in engine.decode(tokenizer, rows, [tokenizer.eos_token_id], gate=gate, hold=False):
            pass
        return seen, rows

    alone = [run([ids]) for ids in prompts]
    computed = engine.prefilled[0]
    assert engine.prefilled[1] == 0 and computed == sum(map(len, prompts))
    seen, rows = run(prompts)
    assert engine.prefilled[1] > 2 * len(_ids(tokenizer, [{"role": "user", "content": documents}])) - 20
    assert engine.prefilled[0] - computed + engine.prefilled[1] == computed
    assert engine.prefilled[1] == copied_tokens(prompts, len(prompts))  # what the time estimate counts
    for ((mine,), (row,)), theirs, together in zip(alone, seen, rows):
        assert together.tokens == row.tokens and together.probability == pytest.approx(row.probability, abs=2e-3)
        assert max(float((a - b).abs().max()) for a, b in zip(mine, theirs, strict=True)) < 5e-3


def test_a_memory_that_cannot_cut_a_sequence_prefills_the_whole_prompt(adapted, tokenizer, merged_f16):
    """Where llama.cpp refuses to cut a copied sequence (a memory without partial removal), the prompt is
    pre-filled in full: nothing of the other prompt's tail stays in its cache."""
    documents = "Documents:\n[1] Kwanzaa runs from December 26 to January 1.\n[2] Zawadi are gifts."
    prompts = [_ids(tokenizer, [{"role": "user", "content": f"{documents}\n\nQuestion: {q}"}]) for q in QUESTIONS]
    engine = LlamaCppEngine(merged_f16)
    settings = dict(max_new_tokens=8, batch_size=3, stop_ids=[tokenizer.eos_token_id], progress=False)
    shared = engine.generate(tokenizer, prompts, **settings)
    assert engine.prefilled[1] > 0

    api = engine.api

    class NoPartialRemoval:
        def __getattr__(self, name):
            return getattr(api, name)

        def llama_memory_seq_rm(self, memory, sequence, start, end):
            return False if start > 0 else api.llama_memory_seq_rm(memory, sequence, start, end)

    engine.api, engine.prefilled = NoPartialRemoval(), [0, 0]
    whole = engine.generate(tokenizer, prompts, **settings)
    assert engine.prefilled == [sum(map(len, prompts)), 0]
    assert whole.token_ids == shared.token_ids == [engine.generate(tokenizer, [p], **settings).token_ids[0]
                                                   for p in prompts]
