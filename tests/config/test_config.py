"""Configuration: shipped files validate, composition, overrides, errors with key paths, digest."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import ConfigError, KwanzaaConfig, config_from_yaml_text, load_training_config

RUN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
RUN_CONFIGS = [p for p in RUN_CONFIGS if "model_profile" in p.read_text()]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_validates(path):
    config = load_training_config(path)
    assert isinstance(config, KwanzaaConfig)
    assert Path(config.data.train_file).is_file() and Path(config.data.eval_file).is_file()


def test_shipped_run_configs_are_training_and_demo():
    assert {p.name for p in RUN_CONFIGS} >= {"training.yaml", "demo.yaml"}


def test_training_yaml_is_the_seed_reference_job():
    c = load_training_config("configs/training.yaml")
    assert c.model.name_or_path.startswith("allenai/OLMo-7B-Instruct")
    assert c.model.trust_remote_code is False
    assert (c.adapter.r, c.adapter.alpha, c.adapter.dropout) == (16, 32, 0.05)
    assert set(c.adapter.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert c.quantization.load_in_4bit and c.quantization.quant_type == "nf4" and c.quantization.double_quant
    assert c.model.precision == "auto"  # bf16 on GPUs that have it, fp16 on the others
    t = c.training
    assert (t.learning_rate, t.lr_scheduler, t.warmup_ratio) == (2e-4, "cosine", 0.03)
    assert (t.per_device_batch_size, t.gradient_accumulation_steps) == (1, 16)
    assert t.gradient_checkpointing and t.optimizer == "paged_adamw_8bit" and t.num_epochs == 4
    assert c.data.max_seq_length == 2048
    assert c.checkpointing.save_total_limit == 3 and c.evaluation.early_stopping_patience is not None


def test_profiles_merge_under_the_run_file(tmp_path):
    (tmp_path / "adapter.yaml").write_text("adapter: {r: 4, alpha: 8, dropout: 0.0, target_modules: [q_proj]}\n")
    (tmp_path / "model.yaml").write_text("model: {name_or_path: smollm2-135m-instruct}\n")
    run = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    run.pop("adapter_profile"), run.pop("model_profile")
    run.update(adapter_profile="adapter.yaml", model_profile="model.yaml", adapter={"r": 8})
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    config = load_training_config(tmp_path / "run.yaml")
    assert config.adapter.r == 8  # the run file wins over its profile
    assert config.adapter.alpha == 8 and config.adapter.target_modules == ["q_proj"]


def test_override_sets_a_typed_value():
    config = load_training_config("configs/demo.yaml", ["training.learning_rate=3e-4", "adapter.target_modules=[q_proj]"])
    assert config.training.learning_rate == pytest.approx(3e-4)
    assert config.adapter.target_modules == ["q_proj"]


def test_wrong_override_type_names_key_and_override():
    with pytest.raises(ConfigError) as err:
        load_training_config("configs/demo.yaml", ["training.num_epochs=many"])
    assert "--set training.num_epochs=many: training.num_epochs:" in str(err.value)


def test_every_error_is_reported_at_once_with_its_source_file(tmp_path):
    run = yaml.safe_load((ROOT / "configs/demo.yaml").read_text())
    run["adapter_profile"] = str(ROOT / "configs/qlora.yaml")
    run["model_profile"] = str(ROOT / "configs/models/smollm2.yaml")
    training = run["training"]
    training["learnig_rate"] = training.pop("learning_rate")
    training["per_device_batch_size"] = "four"
    training["warmup_ratio"] = 1.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(run))
    with pytest.raises(ConfigError) as err:
        load_training_config(bad)
    problems = err.value.problems
    assert len(problems) == 4
    assert any(p.endswith("bad.yaml: training.learnig_rate: unknown key") for p in problems)
    assert any("training.learning_rate: required key is missing" in p for p in problems)
    assert any("bad.yaml: training.per_device_batch_size:" in p and "'four'" in p for p in problems)
    assert any("bad.yaml: training.warmup_ratio:" in p and "1.5" in p for p in problems)


def test_missing_profile_and_self_inclusion_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("adapter_profile: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_training_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("model_profile: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: file not found"):
        load_training_config(tmp_path / "b.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    (tmp_path / "c.yaml").write_text("run:\n  name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+:\d+: invalid YAML"):
        load_training_config(tmp_path / "c.yaml")


def test_config_is_frozen():
    config = load_training_config("configs/demo.yaml")
    with pytest.raises(Exception):
        config.training.learning_rate = 1.0


def test_digest_is_stable_and_survives_a_yaml_round_trip():
    a = load_training_config("configs/demo.yaml")
    b = config_from_yaml_text(a.to_yaml())
    assert a.digest() == b.digest() == load_training_config("configs/demo.yaml").digest()
    assert a.digest() != load_training_config("configs/demo.yaml", ["run.seed=7"]).digest()


def test_cli_misspelt_key_exits_2_naming_it_without_traceback(tmp_path, capsys):
    code = main(["train", "--config", "configs/demo.yaml", "--set", "training.learnig_rate=1e-4", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert "training.learnig_rate: unknown key" in err and "Traceback" not in err


def test_cli_out_of_range_value_exits_2(capsys):
    assert main(["train", "--config", "configs/demo.yaml", "--set", "adapter.dropout=1.5", "--dry-run"]) == 2
    assert "adapter.dropout" in capsys.readouterr().err


def test_cli_missing_config_file_exits_2(capsys):
    assert main(["train", "--config", "configs/nope.yaml", "--dry-run"]) == 2
    assert "configs/nope.yaml: file not found" in capsys.readouterr().err


def test_a_run_file_builds_on_another_through_run_profile():
    quality = load_training_config(ROOT / "configs/quality.yaml")
    demo = load_training_config(ROOT / "configs/demo.yaml")
    assert quality.run.name == "kwanzaa-quality" and quality.training.preference.enabled
    assert quality.training.preference.near_miss_file == "data/kwanzaa_near_miss.jsonl"
    same = {"run": {"name"}, "training": {"preference"}}
    for section, values in demo.to_dict().items():
        for key, value in values.items():
            if key not in same.get(section, set()):
                assert quality.to_dict()[section][key] == value, f"{section}.{key}"
