"""`export --merge`: the adapter merged into the de-quantized base, sealed, and checked by logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kwanzaa_adapter.artifacts import verify_artifact
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.export import CHECK_FILE, EXPORT_RECORD, EXPORT_REQUIRED, export_merged, sample_prompt_ids
from kwanzaa_adapter.models.causal_lm import load_base_as_trained
from kwanzaa_adapter.modeling import load_verified_adapter
from kwanzaa_adapter.config import load_training_config
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


def test_merged_logits_match_base_plus_adapter_within_tolerance(exported):
    check = json.loads((exported.directory / CHECK_FILE).read_text())
    assert check["passed"] and check["max_abs_diff"] <= check["tolerance"] == 1e-3
    assert check["prompts"] == 3 and check["positions"] > 100
    record = json.loads((exported.directory / EXPORT_RECORD).read_text())
    assert record["adapter"]["base_digest_matches"] and record["base_model"]["dequantized_from"] == "4-bit nf4"


def test_merged_model_holds_no_adapter_and_reproduces_the_adapted_model(exported, tiny_artifact):
    """Independent of the stored check: reload both sides here and compare."""
    config = load_training_config(tiny_artifact[0])
    base, tokenizer, _, _ = load_base_as_trained(config, "cpu")
    adapted = load_verified_adapter(base.dequantize(dtype=torch.float32), tiny_artifact[1]).eval()
    merged = AutoModelForCausalLM.from_pretrained(exported.directory, dtype=torch.float32).eval()
    assert not [name for name, _ in merged.named_parameters() if "lora" in name]
    with torch.inference_mode():
        for ids in sample_prompt_ids(tokenizer, config, "cpu"):
            torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                       atol=1e-3, rtol=0)
        # and the adapter does change the model: the check is not comparing the base with itself
        ids = sample_prompt_ids(tokenizer, config, "cpu")[0]
        with adapted.disable_adapter():
            assert not torch.allclose(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-3)


def test_export_cli_prints_the_check_and_refuses_an_existing_directory(tiny_artifact, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(tiny_artifact[1]), "--merge", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "logit check passed: max |merged - base+adapter| = " in printed and "tolerance 1e-03" in printed
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
