"""Multi-process training through the engines (torchrun + DDP on gloo), and the shipped launcher configs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, write_run_config
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling.loading import lora_config
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.workflow import train_adapter

ACCELERATE_CONFIGS = sorted((ROOT / "configs/accelerate").glob("*.yaml"))
DEEPSPEED_CONFIGS = {"zero2.json": 2, "zero3.json": 3}
# Values the transformers DeepSpeed integration fills in from TrainingArguments.
HF_AUTO_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping")
ATOL, RTOL = 1e-5, 1e-4  # DDP vs single process: the same sums, reduced in another order


def _torchrun(config: Path, cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "kwanzaa_adapter.cli", "train", "--config", str(config)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def ddp_and_single(tmp_path_factory, tiny_model_dir):
    """The same 4 optimizer steps of global batch 2: 2 processes x 1 sample, and 1 process x 1 sample x 2 accumulated."""
    ddp_dir, single_dir = tmp_path_factory.mktemp("ddp"), tmp_path_factory.mktemp("single")
    ddp_config = write_run_config(ddp_dir, tiny_model_dir,
                                  training={"per_device_batch_size": 1, "gradient_accumulation_steps": 1})
    single_config = write_run_config(single_dir, tiny_model_dir,
                                     training={"per_device_batch_size": 1, "gradient_accumulation_steps": 2})
    ddp = _torchrun(ddp_config, ddp_dir)
    assert ddp.returncode == 0, ddp.stderr[-4000:]
    return ddp, ddp_dir / "outputs" / "tiny", train_adapter(single_config)


def initial_adapter(run_config: Path, base_dir: Path) -> dict[str, torch.Tensor]:
    """The adapter as the run's LoRA config initialises it on the base, in the saved adapter's key names."""
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return get_peft_model_state_dict(get_peft_model(base, lora_config(load_training_config(run_config))))


def test_two_process_ddp_adapter_equals_single_process_with_the_same_global_batch(ddp_and_single, tiny_model_dir):
    _, ddp_run, single = ddp_and_single
    ddp_tensors = load_file(ddp_run / "final_artifact" / "adapter_model.safetensors")
    single_tensors = load_file(single.artifact_dir / "adapter_model.safetensors")
    assert set(ddp_tensors) == set(single_tensors)
    for name, tensor in single_tensors.items():
        torch.testing.assert_close(ddp_tensors[name], tensor, atol=ATOL, rtol=RTOL, msg=name)
    # The comparison is between trained adapters, not two initialisations: every LoRA B (zeros as
    # PEFT initialises it) moved from its initial value by far more than the comparison's tolerance.
    initial = initial_adapter(single.artifact_dir / "training_config.yaml", tiny_model_dir)
    assert set(initial) == set(single_tensors)
    lora_b = [name for name in initial if ".lora_B." in name]
    assert len(lora_b) == 14  # 7 projections x 2 blocks
    for name in lora_b:
        assert torch.all(initial[name] == 0), name
        assert float((single_tensors[name] - initial[name]).abs().max()) > 100 * ATOL, name


def test_only_the_main_process_writes_and_reports(ddp_and_single):
    result, ddp_run, _ = ddp_and_single
    assert verify_artifact(ddp_run / "final_artifact").ok
    assert result.stdout.count("artifact v0.1.0") == 1  # one process prints the result
    history = [json.loads(line) for line in (ddp_run / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h["loss"] is not None] == [1, 2, 3, 4]  # logged once, not per process
    assert len(list((ddp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert not [p for p in ddp_run.parent.iterdir() if p.name != "tiny"]  # no second run directory
    metadata = json.loads((ddp_run / "final_artifact" / "metadata.json").read_text())
    assert metadata["final_metrics"]["steps"] == 4


def test_single_process_run_keeps_its_own_layout(ddp_and_single):
    _, _, single = ddp_and_single
    assert single.run_dir.name == "tiny" and verify_artifact(single.artifact_dir).ok


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_is_read_by_accelerate(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert config.num_processes >= 2 and config.use_cpu is False
    assert config.mixed_precision == "no"  # precision comes from the run config (training.bf16)
    if config.distributed_type == "DEEPSPEED":
        referenced = ROOT / config.deepspeed_config["deepspeed_config_file"]
        assert referenced.name in DEEPSPEED_CONFIGS and referenced.is_file()
    if config.distributed_type == "FSDP":
        assert config.fsdp_config["fsdp_use_orig_params"] is False  # required with frozen 4-bit weights
        assert config.fsdp_config["fsdp_sync_module_states"] is True


def test_shipped_configs_cover_ddp_fsdp_and_both_zero_stages():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {str(ClusterConfig.from_yaml_file(str(p)).distributed_type) for p in ACCELERATE_CONFIGS}
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED"} <= {k.split(".")[-1] for k in kinds}
    assert {p.name for p in (ROOT / "configs/deepspeed").glob("*.json")} == set(DEEPSPEED_CONFIGS)


@pytest.mark.parametrize("name,stage", DEEPSPEED_CONFIGS.items())
def test_deepspeed_config_leaves_batch_and_clipping_to_the_trainer(name, stage):
    config = json.loads((ROOT / "configs/deepspeed" / name).read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in HF_AUTO_KEYS:
        assert config[key] == "auto", key  # one source of truth: the run config
    assert config["bf16"]["enabled"] == "auto"
    assert "optimizer" not in config and "scheduler" not in config  # the Trainer's (paged AdamW, cosine)
    assert config["zero_allow_untested_optimizer"] is True
    if importlib.util.find_spec("deepspeed") is not None:
        from deepspeed.runtime.config import DeepSpeedConfig

        resolved = {**config, "train_batch_size": 16, "train_micro_batch_size_per_gpu": 1,
                    "gradient_accumulation_steps": 16, "gradient_clipping": 1.0,
                    "bf16": {"enabled": True}, "fp16": {"enabled": False}}
        assert DeepSpeedConfig(resolved).zero_optimization_stage == stage
