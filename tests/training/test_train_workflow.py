"""The training workflow end to end on a tiny 4-bit model: artifact, base weights, reproducibility."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from conftest import ROOT, write_run_config
from helpers import CrashAfter
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling.loading import load_base_model
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.safety.checksums import compute_model_state_checksum
from kwanzaa_adapter.training.workflow import WeightsChangedError, train_adapter

ARTIFACT_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "metadata.json", "training_config.yaml",
    "training_metrics.json", "training_curves.png", "README.md", "checksums.json",
}


class KeepModel(TrainerCallback):
    """Holds on to the trained model so a test can compare it with what was saved."""

    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


class CorruptBaseWeight(TrainerCallback):
    """Test hook: edits one frozen base tensor in place during training."""

    name = "model.layers.0.input_layernorm.weight"

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            dict(model.base_model.model.named_parameters())[self.name].data[0] += 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One tiny training run, shared by the tests that only read its outputs."""
    directory = tmp_path_factory.mktemp("run")
    config = write_run_config(directory, tiny_model_dir)
    keep = KeepModel()
    result = train_adapter(config, callbacks=(keep,))
    return config, result, keep.model


def test_training_publishes_exactly_the_artifact_files(trained):
    _, result, _ = trained
    assert {p.name for p in result.artifact_dir.iterdir()} == ARTIFACT_FILES
    run = {p.name for p in result.run_dir.iterdir()}
    assert {"final_artifact", "adapter", "tensorboard", "baseline_checksums.json", "metrics_history.jsonl",
            "training_summary.json", "training_results.json", "checkpoint-2", "checkpoint-4"} <= run
    assert not any(name.startswith(".tmp-") for name in run)
    assert not (result.run_dir / "runs").exists()
    assert list((result.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert verify_artifact(result.artifact_dir).ok


def test_metadata_records_provenance_and_metrics(trained):
    config_path, result, _ = trained
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    config = load_training_config(config_path)
    assert metadata["config_sha256"] == config.digest()
    assert metadata["artifact_version"] == "0.1.0" and metadata["seed"] == 7
    assert set(metadata["datasets"]) == {"train", "eval"} and metadata["datasets"]["train"]["rows"] == 12
    assert len(metadata["datasets"]["train"]["sha256"]) == 64
    baseline = json.loads((result.run_dir / "baseline_checksums.json").read_text())
    assert metadata["base_model"]["model_digest"] == baseline["model_digest"]
    assert metadata["parameters"]["trainable"] > 0 and metadata["versions"]["peft"]
    assert metadata["final_metrics"]["eval_loss"] == pytest.approx(result.summary["final_eval_loss"])
    card = (result.artifact_dir / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card and "training_curves.png" in card
    history = [json.loads(line) for line in (result.run_dir / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["loss"] is not None] == [1, 2, 3, 4]
    assert all(h["tokens_per_second"] > 0 for h in history if h["loss"] is not None)


def test_base_weights_unchanged_after_training(trained, tiny_model_dir):
    config_path, result, model = trained
    baseline = json.loads((result.run_dir / "baseline_checksums.json").read_text())
    assert compute_model_state_checksum(model)["model_digest"] == baseline["model_digest"]
    fresh, _, _ = load_base_model(load_training_config(config_path), "cpu", "float32")
    assert compute_model_state_checksum(fresh)["model_digest"] == baseline["model_digest"]


def test_adapter_loads_with_plain_peft_and_gives_the_in_memory_logits(trained):
    from peft import PeftModel

    config_path, result, model = trained
    base, tokenizer, _ = load_base_model(load_training_config(config_path), "cpu", "float32")
    loaded = PeftModel.from_pretrained(base, str(result.artifact_dir)).eval()
    ids = tokenizer("Kwanzaa runs from December 26 to January 1.", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        actual = loaded(input_ids=ids).logits
    assert torch.equal(expected, actual)


def test_a_second_run_is_byte_identical_and_versioned_beside_the_first(trained):
    config_path, first, _ = trained
    second = train_adapter(config_path)
    assert second.version == "0.1.1" and second.run_dir.name == "tiny-v0.1.1"
    assert verify_artifact(first.artifact_dir).ok  # the published artifact was not touched
    a = (first.artifact_dir / "adapter_model.safetensors").read_bytes()
    b = (second.artifact_dir / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_changed_base_tensor_fails_the_run_by_name_and_publishes_nothing(tmp_path, tiny_model_dir):
    config = write_run_config(tmp_path, tiny_model_dir, training={"max_steps": 2})
    with pytest.raises(WeightsChangedError, match=CorruptBaseWeight.name):
        train_adapter(config, callbacks=(CorruptBaseWeight(),))
    run_dir = tmp_path / "outputs" / "tiny"
    assert not (run_dir / "final_artifact").exists()
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]


def _tamper(artifact: Path, how: str) -> str:
    if how == "flipped byte":
        target = artifact / "adapter_model.safetensors"
        data = bytearray(target.read_bytes())
        data[-1] ^= 0x01
        target.write_bytes(bytes(data))
        return "adapter_model.safetensors"
    if how == "deleted file":
        (artifact / "metadata.json").unlink()
        return "metadata.json"
    if how == "added file":
        (artifact / "notes.txt").write_text("hello")
        return "notes.txt"
    if how == "dotdot path":
        manifest = json.loads((artifact / "checksums.json").read_text())
        manifest["files"]["../escape.json"] = manifest["files"]["metadata.json"]
        (artifact / "checksums.json").write_text(json.dumps(manifest))
        return "../escape.json"
    if how == "symlink":
        (artifact / "link.json").symlink_to(artifact / "metadata.json")
        return "link.json"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["flipped byte", "deleted file", "added file", "dotdot path", "symlink"])
def test_verify_exits_1_naming_the_tampered_file(trained, tmp_path, capsys, how):
    _, result, _ = trained
    copy = tmp_path / "artifact"
    shutil.copytree(result.artifact_dir, copy)
    assert main(["verify", str(copy)]) == 0
    capsys.readouterr()
    name = _tamper(copy, how)
    assert main(["verify", str(copy)]) == 1
    assert name in capsys.readouterr().out


def test_info_prints_metadata_and_metrics(trained, capsys):
    _, result, _ = trained
    assert main(["info", str(result.artifact_dir)]) == 0
    out = capsys.readouterr().out
    assert "artifact_version" in out and "0.1.0" in out and "eval_loss" in out


def test_bad_data_line_exits_2_naming_it_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir)
    train = tmp_path / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[3] = '{"messages": [{"role": "robot", "content": "hi"}]}'
    train.write_text("\n".join(lines) + "\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.jsonl:4" in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir)
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "effective 2" in out and "steps/epoch" in out and "total" in out
    assert not (tmp_path / "outputs").exists()


def test_dry_run_of_the_reference_job_fits_the_seed_budget(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["train", "--config", "configs/training.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "allenai/OLMo-7B-Instruct" in out and "within the seed's 12 GiB GPU budget" in out
    assert "effective 16" in out


def test_resume_continues_from_the_latest_checkpoint_to_the_same_adapter(trained, tmp_path, tiny_model_dir):
    _, uninterrupted, _ = trained
    config = write_run_config(tmp_path, tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config, callbacks=(CrashAfter(2),))
    run_dir = tmp_path / "outputs" / "tiny"
    assert (run_dir / "checkpoint-2").is_dir() and not (run_dir / "final_artifact").exists()
    with pytest.raises(Exception, match="unfinished run; pass --resume"):
        train_adapter(config)
    result = train_adapter(config, resume=True)
    assert verify_artifact(result.artifact_dir).ok
    resumed = (result.artifact_dir / "adapter_model.safetensors").read_bytes()
    assert resumed == (uninterrupted.artifact_dir / "adapter_model.safetensors").read_bytes()


def test_resume_without_a_checkpoint_exits_2(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir)
    assert main(["train", "--config", str(config), "--resume"]) == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err


def test_eval_command_compares_base_and_adapter_and_writes_predictions(trained, tmp_path, capsys):
    config_path, result, _ = trained
    output = tmp_path / "eval" / "metrics.json"
    assert main(["eval", "--config", str(config_path), "--adapter", str(result.artifact_dir),
                 "--output", str(output)]) == 0
    assert "refusal_correctness_rate" in capsys.readouterr().out
    metrics = json.loads(output.read_text())
    names = {"json_validity_rate", "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate",
             "gold_citation_rate", "answer_correctness_rate", "gold_citation_precision", "exact_answer_rate"}
    assert set(metrics) == {"base", "lexical", "adapter", "engine", "baselines", "data"}
    assert metrics["data"] == {"file": str(result.run_dir.parent.parent / "eval.jsonl"), "records": 4}
    assert set(metrics["base"]) == set(metrics["lexical"]) == set(metrics["adapter"]) == names
    assert metrics["engine"] == {"base": {"engine": "reference"}, "adapter": {"engine": "reference"}}
    rows = [json.loads(line) for line in (output.parent / "eval_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 4 and {r["model"] for r in rows} == {"base", "lexical", "adapter"}
    assert {r["engine"] for r in rows} == {"reference", "lexical"}
    assert {"id", "output", "json_valid", "refusal_correct"} <= set(rows[0])


def test_eval_refuses_a_tampered_adapter_with_exit_1(trained, tmp_path, capsys):
    config_path, result, _ = trained
    copy = tmp_path / "artifact"
    shutil.copytree(result.artifact_dir, copy)
    _tamper(copy, "flipped byte")
    assert main(["eval", "--config", str(config_path), "--adapter", str(copy)]) == 1
    assert "adapter_model.safetensors" in capsys.readouterr().err


def test_behavioral_metrics_reach_metadata_card_and_chart(tmp_path, tiny_model_dir):
    config = write_run_config(tmp_path, tiny_model_dir, training={"max_steps": 2}, evaluation={"behavioral": True})
    result = train_adapter(config)
    assert {p.name for p in result.artifact_dir.iterdir()} == ARTIFACT_FILES | {"behavior_comparison.png"}
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    behavioral = metadata["final_metrics"]["behavioral"]
    assert set(behavioral["adapter"]) >= {"json_validity_rate", "citation_rate"}
    card = (result.artifact_dir / "README.md").read_text()
    assert "| json_validity_rate |" in card and "| answer_correctness_rate |" in card
    assert "| metric | base (grammar) | lexical rules | adapter |" in card
    assert len((result.run_dir / "eval_predictions.jsonl").read_text().splitlines()) == 3 * 4


def test_resume_refuses_a_base_model_that_differs_from_the_runs_baseline(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config, callbacks=(CrashAfter(2),))
    baseline_path = tmp_path / "outputs" / "tiny" / "baseline_checksums.json"
    baseline = json.loads(baseline_path.read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    baseline["tensors"][name]["sha256"] = "0" * 64
    baseline_path.write_text(json.dumps(baseline))
    assert main(["train", "--config", str(config), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and name in err
    assert not (tmp_path / "outputs" / "tiny" / "final_artifact").exists()


def test_auto_gradient_checkpointing_follows_the_free_memory(monkeypatch):
    """auto: on when the estimate without recomputation exceeds half of the free memory, off otherwise."""
    from kwanzaa_adapter.modeling import planning

    monkeypatch.chdir(ROOT)
    config = load_training_config("configs/training.yaml", ["training.gradient_checkpointing=auto"])
    arch = config.model.architecture
    needed = planning.estimate_memory(config, arch, "cuda", checkpointing=False).total
    assert planning.gradient_checkpointing_on(config, arch, "cuda", free_bytes=int(1.9 * needed)) is True
    assert planning.gradient_checkpointing_on(config, arch, "cuda", free_bytes=int(2.1 * needed)) is False
    assert planning.estimate_memory(config, arch, "cuda", checkpointing=True).total < needed
    fixed = load_training_config("configs/training.yaml")
    assert planning.gradient_checkpointing_on(fixed, arch, "cuda", free_bytes=10**15) is True  # as set


def test_recomputation_chosen_by_auto_trains_the_same_adapter(trained, tmp_path, tiny_model_dir, monkeypatch):
    """A device short of memory gets gradient checkpointing from `auto`; the adapter it trains is the same."""
    from kwanzaa_adapter.modeling import planning

    monkeypatch.setattr(planning, "free_memory_bytes", lambda device: 1)
    config = write_run_config(tmp_path, tiny_model_dir, training={"gradient_checkpointing": "auto"})
    result = train_adapter(config)
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    assert metadata["gradient_checkpointing"] is True
    _, first, _ = trained
    assert json.loads((first.artifact_dir / "metadata.json").read_text())["gradient_checkpointing"] is False
    from safetensors.torch import load_file

    ours = load_file(result.artifact_dir / "adapter_model.safetensors")
    theirs = load_file(first.artifact_dir / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_share_is_measured_on_the_batches_the_trainer_draws(tmp_path, tiny_model_dir, monkeypatch):
    """Length-grouped batches: the share reported is the one of the micro-batches actually trained on."""
    from transformers import Trainer

    from kwanzaa_adapter.data.collation import padding_share

    drawn, step = [], Trainer.training_step

    def recording(self, model, inputs, *args, **kwargs):
        drawn.append({k: inputs[k].clone() for k in ("input_ids", "attention_mask")})
        return step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(Trainer, "training_step", recording)
    config = write_run_config(tmp_path, tiny_model_dir, data={"batching": "length_grouped"})
    result = train_adapter(config)
    assert len(drawn) == 4 and result.summary["padding_share"] == pytest.approx(padding_share(drawn))
    assert result.summary["padding_share"] > 0  # two rows of different lengths per micro-batch
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    assert metadata["final_metrics"]["padding_share"] == result.summary["padding_share"]
    assert "padding_share" not in metadata["datasets"]["train"]  # no longer guessed from a sorted order
