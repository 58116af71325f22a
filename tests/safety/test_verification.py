"""Base-weight checksums (4-bit quant state included) and freeze checks (SPEC section 3, steps 2-3, 6)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, prepare_model_for_kbit_training

from conftest import build_tiny_model
from kwanzaa_adapter.safety.checksums import (
    FreezeError,
    compare_model_checksums,
    compute_model_state_checksum,
    get_trainable_parameters_summary,
    report_dtype_changes,
    save_base_model_checksums,
    snapshot_dtypes,
    verify_adapter_state_dict,
    verify_base_weights_unchanged,
    verify_only_adapter_trainable,
)

TARGETS = ["q_proj", "v_proj"]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _lora(model: torch.nn.Module, **kwargs):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kwargs))


@pytest.fixture
def vocab(tokenizer) -> int:
    return len(tokenizer)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama", len(tokenizer)).save_pretrained(path)
    return path


def _load_4bit(path: Path, dtype: torch.dtype | None = None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    extra = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map={"": "cpu"}, **extra
    )


@pytest.fixture
def model_4bit(tiny_checkpoint: Path):
    return _load_4bit(tiny_checkpoint)


# --- checksums of a plain model -------------------------------------------------------------


def test_checksums_cover_every_parameter_and_buffer_and_are_deterministic(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    checksums = compute_model_state_checksum(model)
    expected = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert set(checksums["tensors"]) == expected
    assert checksums == compute_model_state_checksum(build_tiny_model("llama", vocab))
    weight = model.get_parameter(Q_PROJ)
    assert checksums["tensors"][Q_PROJ] == {
        "sha256": hashlib.sha256(weight.detach().numpy().tobytes()).hexdigest(),
        "dtype": "float32",
        "shape": [64, 64],
    }


def test_base_checksums_detect_one_changed_weight_by_name(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    baseline = compute_model_state_checksum(model)
    with torch.no_grad():
        model.get_parameter("model.layers.1.mlp.up_proj.weight")[3, 7] += 1e-6
    current = compute_model_state_checksum(model)
    diff = compare_model_checksums(baseline, current)
    assert (diff.changed, diff.missing, diff.added) == (("model.layers.1.mlp.up_proj.weight",), (), ())
    assert current["model_digest"] != baseline["model_digest"]
    assert "changed  model.layers.1.mlp.up_proj.weight" in diff.format()


def test_same_bytes_in_another_shape_or_dtype_count_as_changed(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    baseline = compute_model_state_checksum(model)
    norm = model.get_parameter("model.norm.weight")
    norm.data = norm.data.view(8, 8)
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq.view(torch.int32)
    diff = compare_model_checksums(baseline, compute_model_state_checksum(model))
    assert diff.changed == ("model.norm.weight", "model.rotary_emb.inv_freq")


def test_non_contiguous_tensor_hashes_its_logical_bytes(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    weight = model.get_parameter(Q_PROJ)
    expected = compute_model_state_checksum(model)["tensors"][Q_PROJ]["sha256"]
    weight.data = weight.data.t().contiguous().t()  # same values, transposed strides
    assert not weight.is_contiguous()
    assert compute_model_state_checksum(model)["tensors"][Q_PROJ]["sha256"] == expected


def test_removed_and_added_tensors_are_named(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    baseline = compute_model_state_checksum(model)
    del model.model.rotary_emb.original_inv_freq
    model.register_buffer("new_scale", torch.ones(2))
    diff = compare_model_checksums(baseline, compute_model_state_checksum(model))
    assert diff.missing == ("model.rotary_emb.original_inv_freq",)
    assert diff.added == ("new_scale",)


def test_lora_wrapped_names_match_plain_model(vocab: int) -> None:
    plain = compute_model_state_checksum(build_tiny_model("llama", vocab))
    wrapped_model = _lora(build_tiny_model("llama", vocab), modules_to_save=["lm_head"])
    wrapped = compute_model_state_checksum(wrapped_model)
    assert wrapped == plain
    assert not any("lora_" in name or "modules_to_save" in name for name in wrapped["tensors"])


def test_lora_training_step_leaves_base_checksums_unchanged(vocab: int, tmp_path: Path) -> None:
    model = _lora(build_tiny_model("llama", vocab))
    baseline = save_base_model_checksums(model, tmp_path / "baseline_checksums.json")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.tensor([[1, 5, 9, 2]])
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it trained
    diff = verify_base_weights_unchanged(model, tmp_path / "baseline_checksums.json")
    assert diff.ok, diff.format()
    assert compute_model_state_checksum(model)["model_digest"] == baseline["model_digest"]


def test_baseline_file_is_sorted_json_and_catches_a_change(vocab: int, tmp_path: Path) -> None:
    model = build_tiny_model("llama", vocab)
    path = tmp_path / "baseline_checksums.json"
    saved = save_base_model_checksums(model, path)
    text = path.read_text()
    assert json.loads(text) == saved
    assert text == json.dumps(saved, indent=2, sort_keys=True) + "\n"
    assert set(saved) == {"algorithm", "model_digest", "tensors"}
    with torch.no_grad():
        model.get_parameter("model.embed_tokens.weight")[0, 0] = 42.0
    assert verify_base_weights_unchanged(model, path).changed == ("model.embed_tokens.weight",)


# --- checksums of a 4-bit model -------------------------------------------------------------


def test_checksums_cover_4bit_quant_state(model_4bit) -> None:
    tensors = compute_model_state_checksum(model_4bit)["tensors"]
    assert {name for name in tensors if name.startswith(Q_PROJ)} == {
        Q_PROJ,
        f"{Q_PROJ}.quant_state.absmax",
        f"{Q_PROJ}.quant_state.code",
        f"{Q_PROJ}.quant_state.offset",
        f"{Q_PROJ}.quant_state.state2.absmax",
        f"{Q_PROJ}.quant_state.state2.code",
    }
    packed = model_4bit.get_parameter(Q_PROJ)
    assert tensors[Q_PROJ] == {
        "sha256": hashlib.sha256(packed.data.numpy().tobytes()).hexdigest(),
        "dtype": "uint8",
        "shape": [2048, 1],
        "quant_state": {
            "shape": [64, 64],
            "dtype": "float32",
            "blocksize": 64,
            "quant_type": "nf4",
            "state2": {"dtype": "float32", "blocksize": 256},
        },
    }


@pytest.mark.parametrize(
    ("mutate", "changed"),
    [
        (lambda w: w.data.view(-1).__setitem__(0, w.data.view(-1)[0] ^ 0x11), Q_PROJ),
        (lambda w: w.quant_state.absmax.view(-1).__setitem__(0, w.quant_state.absmax.view(-1)[0] ^ 1),
         f"{Q_PROJ}.quant_state.absmax"),
        (lambda w: w.quant_state.offset.add_(1e-3), f"{Q_PROJ}.quant_state.offset"),
        (lambda w: w.quant_state.state2.absmax.mul_(1.5), f"{Q_PROJ}.quant_state.state2.absmax"),
        (lambda w: setattr(w.quant_state, "blocksize", 128), Q_PROJ),
        (lambda w: setattr(w.quant_state, "quant_type", "fp4"), Q_PROJ),
    ],
    ids=["packed-data", "absmax", "offset", "nested-absmax", "blocksize", "quant-type"],
)
def test_4bit_change_is_reported_by_name(model_4bit, mutate, changed: str) -> None:
    baseline = compute_model_state_checksum(model_4bit)
    with torch.no_grad():
        mutate(model_4bit.get_parameter(Q_PROJ))
    diff = compare_model_checksums(baseline, compute_model_state_checksum(model_4bit))
    assert (diff.changed, diff.missing, diff.added) == ((changed,), (), ())


def test_4bit_lora_wrapped_names_match_plain_model(model_4bit) -> None:
    plain = compute_model_state_checksum(model_4bit)
    assert compute_model_state_checksum(_lora(model_4bit)) == plain


def test_4bit_trainable_summary_counts_logical_weights(model_4bit, vocab: int) -> None:
    full = sum(p.numel() for p in build_tiny_model("llama", vocab).parameters())
    assert get_trainable_parameters_summary(model_4bit)["total"] == full
    wrapped = _lora(model_4bit)
    summary = verify_only_adapter_trainable(wrapped)
    assert (summary["trainable"], summary["total"]) == wrapped.get_nb_trainable_parameters()


def test_kbit_preparation_dtype_changes_are_listed(tiny_checkpoint: Path) -> None:
    model = _load_4bit(tiny_checkpoint, dtype=torch.bfloat16)
    unquantized = {n for n, p in model.named_parameters() if type(p).__name__ != "Params4bit"}
    before = snapshot_dtypes(model)
    assert {before[n] for n in unquantized} == {torch.bfloat16}
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    changes = report_dtype_changes(before, _lora(model))  # names compare through the PEFT wrapper
    assert {c.name for c in changes} == unquantized
    assert {(c.before, c.after) for c in changes} == {(torch.bfloat16, torch.float32)}
    assert {"model.norm.weight", "model.embed_tokens.weight"} <= unquantized


# --- freeze checks --------------------------------------------------------------------------


def test_only_lora_trainable_passes_and_unfrozen_base_is_named(vocab: int) -> None:
    model = _lora(build_tiny_model("llama", vocab))
    summary = verify_only_adapter_trainable(model)
    # r * (in + out) per target: q_proj 64->64, v_proj 64->32, in 2 layers
    assert summary["trainable"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))
    assert summary["percent"] == pytest.approx(100 * summary["trainable"] / summary["total"])
    assert {n.split(".")[-3] for n in summary["trainable_names"]} == {"lora_A", "lora_B"}
    assert len(summary["trainable_names"]) == 8
    model.get_parameter("base_model.model.model.norm.weight").requires_grad_(True)
    with pytest.raises(FreezeError, match="base_model.model.model.norm.weight") as excinfo:
        verify_only_adapter_trainable(model)
    assert excinfo.value.names == ("base_model.model.model.norm.weight",)


def test_modules_to_save_counts_as_unfrozen_base(vocab: int) -> None:
    model = _lora(build_tiny_model("llama", vocab), modules_to_save=["lm_head"])
    with pytest.raises(FreezeError) as excinfo:
        verify_only_adapter_trainable(model)
    assert excinfo.value.names == ("base_model.model.lm_head.modules_to_save.default.weight",)


def test_unwrapped_model_names_every_trainable_parameter(vocab: int) -> None:
    model = build_tiny_model("llama", vocab)
    with pytest.raises(FreezeError) as excinfo:
        verify_only_adapter_trainable(model)
    assert set(excinfo.value.names) == {n for n, _ in model.named_parameters()}


def test_nothing_trainable_is_an_error(vocab: int) -> None:
    model = _lora(build_tiny_model("llama", vocab))
    model.requires_grad_(False)
    with pytest.raises(FreezeError, match="no parameter is trainable"):
        verify_only_adapter_trainable(model)


def test_adapter_state_dict_with_base_tensor_is_named(vocab: int) -> None:
    model = _lora(build_tiny_model("llama", vocab))
    state = get_peft_model_state_dict(model)
    verify_adapter_state_dict(state)
    polluted = {**state, "base_model.model.lm_head.weight": torch.zeros(1)}
    polluted["model.norm.weight"] = torch.zeros(1)
    with pytest.raises(FreezeError) as excinfo:
        verify_adapter_state_dict(polluted)
    assert excinfo.value.names == ("base_model.model.lm_head.weight", "model.norm.weight")
    with pytest.raises(FreezeError, match="no tensors"):
        verify_adapter_state_dict({})


def test_adapter_saved_with_modules_to_save_is_refused(vocab: int) -> None:
    model = _lora(build_tiny_model("llama", vocab), modules_to_save=["lm_head"])
    with pytest.raises(FreezeError) as excinfo:
        verify_adapter_state_dict(get_peft_model_state_dict(model))
    assert excinfo.value.names == ("base_model.model.lm_head.weight",)
