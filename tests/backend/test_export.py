"""`export --merge`: the adapter merged into the de-quantized base, sealed, and checked by logits against
the model as trained (4-bit base + adapter) and against the de-quantized base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kwanzaa_adapter.backend import export
from kwanzaa_adapter.backend.export import (
    CHECK_FILE,
    DEFAULT_TOLERANCE,
    EXPORT_RECORD,
    EXPORT_REQUIRED,
    MergeCheckError,
    as_trained_tolerance_for,
    export_merged,
    logits,
    sample_prompt_ids,
)
from kwanzaa_adapter.backend.models.causal_lm import load_base_as_trained
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling.loading import load_verified_adapter, set_compute_precision
from kwanzaa_adapter.safety.artifacts import verify_artifact
from tiny_artifact import copy_artifact, flip_last_byte, other_base_dir, tiny_artifact  # noqa: F401


@pytest.fixture(scope="module")
def exported(tiny_artifact, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "merged"
    return export_merged(tiny_artifact[1], out)


def test_export_writes_a_sealed_safetensors_model_with_tokenizer_and_chat_template(exported):
    files = {p.name for p in exported.directory.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", CHECK_FILE, EXPORT_RECORD, "checksums.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert not [p for p in exported.directory.parent.iterdir() if p.name.startswith(".tmp-")]
    assert verify_artifact(exported.directory, required_files=EXPORT_REQUIRED).ok
    config = json.loads((exported.directory / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert AutoTokenizer.from_pretrained(exported.directory).chat_template


def test_verify_command_knows_the_export_layout(exported, capsys):
    assert main(["verify", str(exported.directory)]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    (exported.directory / "config.json").rename(exported.directory / "config.json.bak")
    try:
        assert main(["verify", str(exported.directory)]) == 1
        assert "missing     config.json" in capsys.readouterr().out
    finally:
        (exported.directory / "config.json.bak").rename(exported.directory / "config.json")


def test_logit_check_reports_both_comparisons_with_their_tolerances(exported):
    check = json.loads((exported.directory / CHECK_FILE).read_text())
    assert check["prompts"] == 3 and check["positions"] > 100 and check["passed"]
    for name, reference in (("as_trained", "4-bit nf4 (float32) base + adapter as trained"),
                            ("dequantized", "de-quantized float32 base + adapter")):
        figures = check[name]
        assert figures["reference"] == reference
        assert figures["passed"] and 0 <= figures["max_abs_diff"] <= figures["tolerance"] == DEFAULT_TOLERANCE
    summary = exported.check.summary()
    assert "merged vs 4-bit nf4 (float32) base + adapter as trained: max |diff| " in summary
    assert "merged vs de-quantized float32 base + adapter: max |diff| " in summary
    record = json.loads((exported.directory / EXPORT_RECORD).read_text())
    assert record["adapter"]["base_digest_matches"] and record["base_model"]["dequantized_from"] == "4-bit nf4"


def test_merged_model_holds_no_adapter_and_reproduces_the_model_as_trained(exported, tiny_artifact):
    """Independent of the stored check: reload both sides here and compare."""
    config = load_training_config(tiny_artifact[0])
    base, tokenizer, _, _ = load_base_as_trained(config, "cpu", "float32")
    trained = load_verified_adapter(base, tiny_artifact[1]).eval()  # the 4-bit base, as training used it
    merged = AutoModelForCausalLM.from_pretrained(exported.directory, dtype=torch.float32).eval()
    assert not [name for name, _ in merged.named_parameters() if "lora" in name]
    with torch.inference_mode():
        for ids in sample_prompt_ids(tokenizer, config, "cpu"):
            torch.testing.assert_close(merged(input_ids=ids).logits, trained(input_ids=ids).logits,
                                       atol=DEFAULT_TOLERANCE, rtol=0)
        # and the adapter does change the model: the check is not comparing the base with itself
        ids = sample_prompt_ids(tokenizer, config, "cpu")[0]
        with trained.disable_adapter():
            assert not torch.allclose(trained(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3)


def zero_one_lora_b(model):
    """A wrong adapter weight: one module's LoRA B zeroed, its trained update lost."""
    weight = model.get_parameter("base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight")
    weight.data.zero_()
    return model


def test_wrong_adapter_weight_in_the_merged_model_fails_both_comparisons(tiny_artifact, tmp_path, monkeypatch):
    save_merged = export.save_merged
    monkeypatch.setattr(export, "save_merged",
                        lambda adapted, tokenizer, directory: save_merged(zero_one_lora_b(adapted), tokenizer, directory))
    with pytest.raises(MergeCheckError) as failure:
        export_merged(tiny_artifact[1], tmp_path / "merged")
    check = failure.value.check
    assert not check.as_trained.passed and not check.dequantized.passed
    assert check.dequantized.max_abs_diff > 10 * check.dequantized.tolerance
    assert "base + adapter as trained: max |diff| " in str(failure.value) and ": FAILED" in str(failure.value)
    assert not (tmp_path / "merged").exists()


def test_a_wrong_unmerged_reference_fails_only_its_own_comparison(tiny_artifact, tmp_path, monkeypatch):
    """The merged model comes from the model as trained (the fast engine's merge); the de-quantized base +
    adapter, unmerged, is a second reference: a fault there shows in that comparison only."""
    dequantized_with_adapter = export.dequantized_with_adapter
    monkeypatch.setattr(export, "dequantized_with_adapter",
                        lambda *args: zero_one_lora_b(dequantized_with_adapter(*args)))
    with pytest.raises(MergeCheckError) as failure:
        export_merged(tiny_artifact[1], tmp_path / "merged")
    check = failure.value.check
    assert check.as_trained.passed and not check.dequantized.passed
    assert check.dequantized.max_abs_diff > 10 * check.dequantized.tolerance
    assert not (tmp_path / "merged").exists()


def test_bf16_dequantization_rounding_is_within_the_as_trained_tolerance(tiny_artifact):
    """A base trained in bf16: the export de-quantizes into bf16 (as training's forward did), the 4-bit
    kernels in float32; the rounding between them (2e-3 on this model) must pass, the fp32 bound would not."""
    config = load_training_config(tiny_artifact[0])
    base, tokenizer, _, _ = load_base_as_trained(config, "cpu", "bfloat16")
    set_compute_precision(base, torch.float32)
    prompts = sample_prompt_ids(tokenizer, config, "cpu")
    quantized = [logits(base, ids) for ids in prompts]
    base = base.dequantize(dtype=torch.float32).to(torch.float32)
    diff = max(float((logits(base, ids) - q).abs().max()) for ids, q in zip(prompts, quantized))
    tolerance, rule = as_trained_tolerance_for(config, "bfloat16", max(float(q.abs().max()) for q in quantized))
    assert diff <= tolerance and rule.startswith("6 bfloat16 eps")


def test_export_cli_prints_the_check_and_refuses_an_existing_directory(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(tiny_artifact[1]), "--merge", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logit check passed over " in printed
    assert "merged vs 4-bit nf4 (float32) base + adapter as trained: max |diff| " in printed
    assert "merged vs de-quantized float32 base + adapter: max |diff| " in printed
    assert main(["export", "--adapter", str(tiny_artifact[1]), "--merge", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_failed_logit_check_exits_1_and_writes_nothing(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(tiny_artifact[1]), "--merge", str(out), "--tolerance", "0"]) == 1
    assert "logit check FAILED" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_tampered_adapter_is_not_exported(tiny_artifact, tmp_path, capsys):
    copy = copy_artifact(tiny_artifact[1], tmp_path / "artifact")
    flip_last_byte(copy / "adapter_model.safetensors")
    assert main(["export", "--adapter", str(copy), "--merge", str(tmp_path / "merged")]) == 1
    assert "mismatched  adapter_model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_export_onto_another_base_is_refused(tiny_artifact, other_base_dir, tmp_path, capsys):
    assert main(["export", "--adapter", str(tiny_artifact[1]), "--merge", str(tmp_path / "merged"),
                 "--config", str(tiny_artifact[0]), "--set", f"model.name_or_path={other_base_dir}"]) == 1
    assert "--allow-base-mismatch" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()
