"""The weights that answer are the weights that were verified (generation/engines.py, modeling/derived.py).

The fast engine answers from a GGUF derived from the verified model and cached in a writable folder. Its
record there guards against accidents only: whoever can write the cache can rewrite both. So a derived
model must match the model in memory by its logits before it answers; its cache key must cover everything
the file depends on; and building one entry from two processes at once must leave a valid model.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

from conftest import write_run_config
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.generation import engines
from kwanzaa_adapter.modeling.derived import DERIVED_RECORD, DerivationError, check_derived, derived_gguf
from kwanzaa_adapter.safety.artifacts import sha256_file
from tests.generation.test_fast_engine import adapted  # noqa: F401 (the module fixture)

pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")


@pytest.fixture(scope="module")
def built(adapted, tokenizer, tmp_path_factory):
    """A cache holding the adapter's and the base's derived models, built once; tests work on copies."""
    cache = tmp_path_factory.mktemp("built-cache")
    for with_adapter in (True, False):
        derived_gguf(adapted, tokenizer, base_digest="tiny", with_adapter=with_adapter, quant="f16", cache_dir=cache)
    return cache


@pytest.fixture
def cache(built, tmp_path):
    return shutil.copytree(built, tmp_path / "cache")


def _config(tmp_path, tiny_model_dir, engine: str, cache):
    return load_training_config(write_run_config(tmp_path, tiny_model_dir,
                                                 inference={"engine": engine, "cache_dir": str(cache)}))


def _swap_in_the_base(adapted, tokenizer, cache):
    """The attack: the base-only GGUF of the same cache copied over the adapter's, its record's sha256 rewritten."""
    options = dict(base_digest="tiny", quant="f16", cache_dir=cache)
    adapter_path, _ = derived_gguf(adapted, tokenizer, with_adapter=True, **options)
    base_path, _ = derived_gguf(adapted, tokenizer, with_adapter=False, **options)
    genuine = sha256_file(adapter_path)[0]
    adapter_path.write_bytes(base_path.read_bytes())
    record = json.loads((adapter_path.parent / DERIVED_RECORD).read_text())
    record["gguf_sha256"] = sha256_file(adapter_path)[0]
    (adapter_path.parent / DERIVED_RECORD).write_text(json.dumps(record))
    return adapter_path, genuine


def test_a_swapped_derived_model_is_rebuilt_under_auto(adapted, tokenizer, tiny_model_dir, tmp_path, cache, caplog):
    path, genuine = _swap_in_the_base(adapted, tokenizer, cache)
    config = _config(tmp_path, tiny_model_dir, "auto", cache)
    with caplog.at_level("WARNING"):
        choice = engines.choose_engine(config, adapted, tokenizer, base_digest="tiny", with_adapter=True)
    assert "is not the verified model" in caplog.text and "rebuilding it" in caplog.text
    assert choice.llamacpp is not None and choice.record["logit_check"]["passed"]
    assert sha256_file(path)[0] == genuine  # the entry holds the adapter's model again
    choice.llamacpp.close()


def test_a_swapped_derived_model_is_refused_when_llamacpp_is_required(adapted, tokenizer, tiny_model_dir, tmp_path,
                                                                       cache):
    _swap_in_the_base(adapted, tokenizer, cache)
    config = _config(tmp_path, tiny_model_dir, "llama.cpp", cache)
    with pytest.raises(DerivationError, match="is not the verified model"):
        engines.choose_engine(config, adapted, tokenizer, base_digest="tiny", with_adapter=True)


def test_the_check_passes_the_base_variant_and_records_its_cost(adapted, tokenizer, tiny_model_dir, tmp_path, cache):
    config = _config(tmp_path, tiny_model_dir, "llama.cpp", cache)
    choice = engines.choose_engine(config, adapted, tokenizer, base_digest="tiny", with_adapter=False)
    check = choice.record["logit_check"]
    assert check["passed"] and check["positions"] > 20 and 0 < check["seconds"] < 2
    choice.llamacpp.close()


def test_the_same_tensors_with_another_alpha_do_not_reuse_the_entry(tokenizer, cache):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import build_tiny_model

    def adapted_with(alpha: int):
        torch.manual_seed(3)
        base = build_tiny_model("llama", len(tokenizer))
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj", "v_proj", "down_proj"],
                                               init_lora_weights=False)).eval()

    options = dict(base_digest="tiny", with_adapter=True, quant="f16", cache_dir=cache)
    first, second = adapted_with(8), adapted_with(16)  # the first is the adapter the cache holds
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    path, _ = derived_gguf(first, tokenizer, **options)
    other, _ = derived_gguf(second, tokenizer, **options)
    assert other.parent != path.parent and sha256_file(other)[0] != sha256_file(path)[0]


def test_two_builders_of_one_entry_both_end_with_a_valid_model(adapted, tokenizer, tmp_path):
    options = dict(base_digest="tiny", with_adapter=True, quant="f16", cache_dir=tmp_path)
    start, results = threading.Barrier(2), []

    def build() -> None:
        start.wait()
        try:
            results.append(derived_gguf(adapted, tokenizer, **options))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            results.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, tuple) for result in results), results
    (path, record), _ = results
    assert check_derived(path.parent, record["derives_from"]) is None
    assert [p.name for p in tmp_path.iterdir()] == [path.parent.name]  # no staging folder left behind


def test_a_cache_that_cannot_be_written_falls_back_to_the_reference(adapted, tokenizer, tiny_model_dir, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder\n")
    config = _config(tmp_path, tiny_model_dir, "auto", blocked)
    choice = engines.choose_engine(config, adapted, tokenizer, base_digest="tiny", with_adapter=True)
    assert choice.llamacpp is None and "cannot derive the fast engine's model" in choice.reason
