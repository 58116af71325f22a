"""Labels cover exactly the assistant turns; packed samples never see each other."""

from __future__ import annotations

import json
import logging
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import build_tiny_model
from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT
from kwanzaa_adapter.data import tokenization
from kwanzaa_adapter.data.chat_template import IGNORE_INDEX, TemplateError, TokenizedExample, tokenize_conversation
from kwanzaa_adapter.data.collation import PackedCollator, PaddedCollator, padding_share, plan_batches
from kwanzaa_adapter.data.tokenization import read_cache, tokenize_dataset, tokenize_file, tokenizer_digest
from kwanzaa_adapter.data.validation import Conversation, DataError, load_examples
from tiny_artifact import flip_last_byte

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is Umoja?"},
    {"role": "assistant", "content": "Unity."},
    {"role": "user", "content": "And Kujichagulia?"},
    {"role": "assistant", "content": "Self-determination, the second principle."},
]


def conversation(user: str, assistant: str, id: str = "x", line: int = 1) -> Conversation:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return Conversation(messages, {"id": id}, "chat", "data.jsonl", line)


def labelled_spans(example: TokenizedExample) -> list[list[int]]:
    spans, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            spans, current = (spans + [current], []) if current else (spans, [])
        else:
            current.append(label)
    return spans + [current] if current else spans


def test_labels_are_exactly_each_assistant_turn_and_its_end_of_turn_token(tokenizer):
    example = tokenize_conversation(MULTI_TURN, tokenizer, None)
    decoded = [tokenizer.decode(span) for span in labelled_spans(example)]
    assert decoded == ["Unity.<|im_end|>", "Self-determination, the second principle.<|im_end|>"]
    assert example.input_ids == list(tokenizer.apply_chat_template(MULTI_TURN, tokenize=True)["input_ids"])
    supervised = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert all(example.labels[i] == example.input_ids[i] for i in supervised)
    assert not example.truncated


def test_truncation_keeps_the_start_and_is_counted(tokenizer):
    long = conversation("q", "word " * 200, id="long")
    short = conversation("q", "a", id="short", line=2)
    full = tokenize_conversation(long.messages, tokenizer, None)
    examples, report = tokenize_dataset([long, short], tokenizer, 64)
    assert examples[0].input_ids == full.input_ids[:64] and examples[0].truncated
    assert (report.rows, report.truncated, report.max_seq_length) == (2, 1, 64)
    assert report.total_tokens == 64 + len(examples[1].input_ids)
    assert report.supervised_tokens == sum(e.supervised_tokens for e in examples)


def test_no_supervised_token_after_truncation_is_an_error_naming_the_example(tokenizer):
    ok = conversation("q", "a", id="fine")
    starved = conversation("long question " * 100, "a", id="starved", line=7)
    with pytest.raises(DataError) as caught:
        tokenize_dataset([ok, starved], tokenizer, 32)
    [issue] = caught.value.issues
    assert (issue.line, issue.kind) == (7, "no_supervised_tokens")
    assert "example id 'starved'" in issue.message and "max_seq_length 32" in issue.message


class _CountingTemplate:
    """A template that prints the number of messages first: no prefix is a prefix of the whole."""

    eos_token_id = 0

    def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
        return {"input_ids": [len(messages)] + [1] * (3 * len(messages)) + [2] * add_generation_prompt}


def test_template_that_is_not_prefix_stable_is_rejected():
    with pytest.raises(TemplateError, match=r"not prefix-stable.*messages\[1\]"):
        tokenize_conversation(conversation("q", "a").messages, _CountingTemplate(), None)


def _write_data(tmp_path, count: int = 3):
    path = tmp_path / "train.jsonl"
    lines = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
              "meta": {"id": str(i)}} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_cache_is_reused_and_keyed_by_everything_that_changes_tokens(tmp_path, tokenizer, monkeypatch):
    data, cache = _write_data(tmp_path), tmp_path / "cache"
    first = tokenize_file(data, tokenizer, 128, cache_dir=cache)
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]

    def must_not_run(*args, **kwargs):
        raise AssertionError("cache miss")

    monkeypatch.setattr(tokenization, "tokenize_dataset", must_not_run)
    assert tokenize_file(data, tokenizer, 128, cache_dir=cache) == first
    monkeypatch.undo()

    tokenize_file(data, tokenizer, 64, cache_dir=cache)
    tokenize_file(data, tokenizer, 128, system_prompt="other", cache_dir=cache)
    _write_data(tmp_path, count=4)
    tokenize_file(data, tokenizer, 128, cache_dir=cache)
    assert len(list(cache.iterdir())) == 4


def edit_an_id(path):
    """Re-saved with one token id changed and the original metadata (its digest included) kept."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["input_ids"][5] += 1
    save_file(tensors, str(path), metadata=metadata)


def cut_short(path):
    path.write_bytes(path.read_bytes()[:-7])


# The last byte of a cache file is the last example's `truncated` flag: flipped, False reads as True.
@pytest.mark.parametrize("damage", [flip_last_byte, edit_an_id, cut_short], ids=lambda f: f.__name__)
def test_damaged_cache_is_detected_and_rebuilt_as_a_fresh_tokenization(tmp_path, tokenizer, caplog, damage):
    data, cache = _write_data(tmp_path), tmp_path / "cache"
    fresh = tokenize_dataset(load_examples(data, DEFAULT_SYSTEM_PROMPT), tokenizer, 128)
    assert tokenize_file(data, tokenizer, 128, cache_dir=cache) == fresh
    [cache_file] = cache.iterdir()
    damage(cache_file)
    with caplog.at_level(logging.WARNING, logger=tokenization.__name__):
        assert tokenize_file(data, tokenizer, 128, cache_dir=cache) == fresh
    assert f"rebuilding the tokenization cache {cache_file}: " in caplog.text
    assert [p.name for p in cache.iterdir()] == [cache_file.name]  # rewritten in place, no leftovers
    assert read_cache(cache_file) == fresh  # and it verifies again


def test_tokenizer_digest_changes_with_the_chat_template(tokenizer):
    before = tokenizer_digest(tokenizer)
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = original + "{{ '' }}"
        assert tokenizer_digest(tokenizer) != before
    finally:
        tokenizer.chat_template = original
    assert tokenizer_digest(tokenizer) == before


def test_packed_collator_restarts_positions_and_ignores_each_first_token():
    samples = [TokenizedExample([5, 6, 7], [5, 6, 7], False), TokenizedExample([8, 9], [-100, 9], False)]
    batch = PackedCollator()(samples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch and batch["use_cache"] is False


# --- isolation of packed samples -------------------------------------------------------------

def _samples(tokenizer, words=(3, 11, 6)) -> list[TokenizedExample]:
    return [tokenize_conversation(conversation("tell me " * n, "Umoja " * (n + 2)).messages, tokenizer, None)
            for n in words]


def _model(kind: str, implementation: str, vocab: int):
    model = build_tiny_model(kind, vocab)
    model.set_attn_implementation(implementation)
    assert model.config._attn_implementation == implementation
    return model


def _packed_logits(model, samples) -> list[torch.Tensor]:
    batch = PackedCollator()(samples)
    with torch.no_grad():
        logits = model(**batch).logits[0]
    return list(logits.split([len(s.input_ids) for s in samples]))


ARCHITECTURES = [(kind, impl) for kind in ("llama", "olmo") for impl in ("sdpa", "eager")]


@pytest.mark.parametrize("kind, implementation", ARCHITECTURES)
def test_packed_loss_equals_token_weighted_mean_of_separate_losses(tokenizer, kind, implementation):
    model, samples = _model(kind, implementation, len(tokenizer)), _samples(tokenizer)
    with torch.no_grad():
        packed = model(**PackedCollator()(samples)).loss.item()
        separate = [model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]),
                          use_cache=False).loss.item() for s in samples]
    weights = [sum(label != IGNORE_INDEX for label in s.labels[1:]) for s in samples]
    expected = sum(loss * w for loss, w in zip(separate, weights)) / sum(weights)
    assert packed == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kind, implementation", ARCHITECTURES)
def test_changing_one_packed_sample_leaves_the_others_logits_unchanged(tokenizer, kind, implementation):
    model, samples = _model(kind, implementation, len(tokenizer)), _samples(tokenizer)
    changed = [TokenizedExample([t + 1 for t in samples[0].input_ids], samples[0].labels, False), *samples[1:]]
    before, after = _packed_logits(model, samples), _packed_logits(model, changed)
    assert not torch.allclose(before[0], after[0], atol=1e-5)
    for index in (1, 2):
        torch.testing.assert_close(after[index], before[index], atol=1e-5, rtol=0)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([samples[index].input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(before[index], alone, atol=1e-5, rtol=0)


def test_a_kv_cache_disables_the_packed_mask(tokenizer):
    """Why the packed batch carries use_cache=False: with a cache, samples see each other."""
    model, samples = _model("llama", "sdpa", len(tokenizer)), _samples(tokenizer)
    batch = {**PackedCollator()(samples), "use_cache": True}
    assert model.config.use_cache
    with torch.no_grad():
        leaky = model(**batch).logits[0].split([len(s.input_ids) for s in samples])
    assert not torch.allclose(leaky[1], _packed_logits(model, samples)[1], atol=1e-5)


# --- padding -----------------------------------------------------------------------------------

def _random_samples(count: int = 50, seed: int = 0) -> list[TokenizedExample]:
    rng = random.Random(seed)
    lengths = [rng.randint(5, 300) for _ in range(count)]
    return [TokenizedExample(list(range(3, 3 + n)), list(range(3, 3 + n)), False) for n in lengths]


def test_packed_batches_have_no_padding():
    samples = _random_samples()
    plan = plan_batches([len(s.input_ids) for s in samples], 1024, padded=False)
    batches = [PackedCollator()([samples[i] for i in batch]) for batch in plan]
    assert sorted(i for batch in plan for i in batch) == list(range(50))
    assert all(b["input_ids"].shape[1] <= 1024 for b in batches)
    assert padding_share(batches) == 0.0


def test_length_grouped_padding_share_is_reported_and_beats_arrival_order():
    samples = _random_samples()
    lengths = [len(s.input_ids) for s in samples]
    collate = PaddedCollator(pad_token_id=2)
    plan = plan_batches(lengths, 1024)
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in plan)
    grouped = [collate([samples[i] for i in batch]) for batch in plan]
    computed = sum(len(b) * max(lengths[i] for i in b) for b in plan)
    assert padding_share(grouped) == pytest.approx((computed - sum(lengths)) / computed)
    arrival = [collate(samples[i:i + 4]) for i in range(0, 50, 4)]
    assert padding_share(grouped) < padding_share(arrival)
    first = grouped[0]
    padded = first["attention_mask"] == 0
    assert (first["labels"][padded] == IGNORE_INDEX).all() and (first["input_ids"][padded] == 2).all()


def test_planner_refuses_a_budget_below_the_longest_sample():
    with pytest.raises(ValueError, match="raise it to at least 300"):
        plan_batches([10, 300], 256)
