"""Base-model resolution (packaged, GGUF, local, hub), 4-bit loading and LoRA on Llama and OLMo shapes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_tiny_model, packaged_gguf_path, write_run_config
from kwanzaa_adapter.backend.models.causal_lm import base_digest_as_trained
from kwanzaa_adapter.config import ConfigError, load_training_config
from kwanzaa_adapter.modeling.loading import add_adapter, load_base_model, run_precision
from kwanzaa_adapter.modeling.sources import (
    CONVERSION_RECORD,
    ModelReferenceError,
    materialize,
    resolve_model_reference,
)
from kwanzaa_adapter.safety.artifacts import sha256_file
from kwanzaa_adapter.safety.checksums import compute_model_state_checksum, verify_only_adapter_trainable


def test_packaged_name_resolves_to_the_gguf_in_its_package():
    source = resolve_model_reference("smollm2-135m-instruct")
    assert source.kind == "packaged" and source.path == packaged_gguf_path()


def test_gguf_path_resolves_as_gguf():
    source = resolve_model_reference(str(packaged_gguf_path()))
    assert source.kind == "gguf" and source.path.suffix == ".gguf"


def test_directory_without_config_is_refused_with_advice(tmp_path):
    with pytest.raises(ModelReferenceError, match="without config.json"):
        resolve_model_reference(str(tmp_path))


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(ModelReferenceError, match="GGUF file not found"):
        resolve_model_reference(str(tmp_path / "nope.gguf"))


def test_unknown_reference_lists_the_packaged_models():
    with pytest.raises(ModelReferenceError, match="smollm2-135m-instruct"):
        resolve_model_reference("not a model")


def test_hub_id_is_resolved_without_network_and_fails_clearly_offline(tmp_path, monkeypatch):
    assert resolve_model_reference("allenai/OLMo-7B-Instruct-hf").kind == "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # The hub library read the variable when it was imported: offline now, not after DNS lookups time out.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    config = load_training_config(write_run_config(tmp_path, tmp_path), ["model.name_or_path=someone/not-cached-model"])
    with pytest.raises(ModelReferenceError, match="cannot load base model 'someone/not-cached-model'.*local directory"):
        load_base_model(config, "cpu", "float32")


@pytest.mark.slow
def test_packaged_model_converts_once_into_a_cached_safetensors_directory():
    source = resolve_model_reference("smollm2-135m-instruct")
    directory = materialize(source)
    files = {p.name for p in Path(directory).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", CONVERSION_RECORD} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)
    record = json.loads((Path(directory) / CONVERSION_RECORD).read_text())
    assert record["source_sha256"] == sha256_file(source.path, follow_symlinks=True)[0]
    assert materialize(resolve_model_reference(str(source.path))) == directory  # same digest, same cache


@pytest.mark.slow
def test_demo_config_loads_the_packaged_model_in_4bit_with_lora_only_trainable(monkeypatch):
    monkeypatch.chdir(ROOT)
    config = load_training_config("configs/demo.yaml")
    model, tokenizer, source = load_base_model(config, "cpu", run_precision(config, "cpu").resolved)
    assert source.kind == "packaged"
    assert "<|im_start|>" in tokenizer.chat_template
    quantized = [n for n, p in model.named_parameters() if type(p).__name__ == "Params4bit"]
    assert len(quantized) == 30 * 7  # every q/k/v/o/gate/up/down projection of the 30 blocks
    peft_model = add_adapter(model, config)
    summary = verify_only_adapter_trainable(peft_model)
    assert config.adapter.top_layers == 20
    assert summary["trainable"] == 4_884_480 * 20 // 30  # r=16 on the seven projections of blocks 10-29
    adapted = {int(name.split(".layers.")[1].split(".")[0]) for name in summary["trainable_names"]}
    assert adapted == set(range(10, 30))
    ids = tokenizer("Habari gani?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=ids).logits).all()


@pytest.mark.parametrize("kind", ["llama", "olmo"])
def test_qlora_on_tiny_llama_and_olmo_trains_only_lora(tmp_path, tokenizer, kind):
    directory = tmp_path / kind
    build_tiny_model(kind, len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = load_training_config(write_run_config(tmp_path, directory))
    model, _, _ = load_base_model(config, "cpu", "float32")
    peft_model = add_adapter(model, config)
    summary = verify_only_adapter_trainable(peft_model)
    # r=4 on 2 blocks of width 64 (k/v project to 32, the MLP is 128 wide): r * (in + out) per projection
    per_block = 4 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
    assert summary["trainable"] == 2 * per_block
    assert all("lora_" in name for name in summary["trainable_names"])


def test_unknown_target_module_names_the_real_linear_layers(tmp_path, tiny_model_dir):
    config = load_training_config(write_run_config(tmp_path, tiny_model_dir, adapter={"target_modules": ["qkv"]}))
    model, _, _ = load_base_model(config, "cpu", "float32")
    with pytest.raises(ModelReferenceError, match=r"\['qkv'\] not found.*q_proj"):
        add_adapter(model, config)


def test_quant_storage_in_the_compute_dtype_for_sharding(tmp_path, tiny_model_dir):
    """FSDP and ZeRO-3 shard 4-bit weights only when they are stored in a float dtype."""
    config = load_training_config(write_run_config(tmp_path, tiny_model_dir,
                                                   quantization={"quant_storage": "bfloat16"}))
    model, _, _ = load_base_model(config, "cpu", "float32")
    packed = {m.weight.dtype for m in model.modules() if type(m).__name__ == "Linear4bit"}
    assert packed == {torch.bfloat16}
    with pytest.raises(ConfigError, match="quantization.quant_storage"):
        load_training_config(write_run_config(tmp_path, tiny_model_dir, quantization={"quant_storage": "int3"}))


def test_trust_remote_code_stays_off_in_every_shipped_profile():
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert "trust_remote_code: true" not in path.read_text(), path


@pytest.mark.parametrize("upcast", [True, False])
def test_kbit_preparation_upcasts_unquantized_weights_only_when_configured(tmp_path, tiny_model_dir, upcast):
    """Training and serving prepare the base alike, so the digest serving checks is the one training recorded."""
    config = load_training_config(write_run_config(
        tmp_path, tiny_model_dir, model={"precision": "bfloat16"}, quantization={"upcast_unquantized": upcast}))
    model, _, _ = load_base_model(config, "cpu", "bfloat16")
    peft_model = add_adapter(model, config)
    unquantized = {p.dtype for n, p in peft_model.named_parameters() if "lora_" not in n and p.dtype.is_floating_point}
    assert unquantized == ({torch.float32} if upcast else {torch.bfloat16})
    assert verify_only_adapter_trainable(peft_model)["trainable"] > 0
    trained_digest = compute_model_state_checksum(peft_model)["model_digest"]
    served, _, _ = load_base_model(config, "cpu", "bfloat16")
    assert base_digest_as_trained(served, config) == trained_digest
