"""bench/gpu_check.py in its CPU mode: every stage of the GPU check runs on tiny shapes and reports its figures.

The check runs once, in a subprocess (it patches transformers' Trainer to count tokens, which must not
leak into this process); the tests read its JSON. The stage runner and the shapes are tested in-process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, load_script

SCRIPT = ROOT / "bench" / "gpu_check.py"
STAGES = ["setup", "workflow", "verify", "generation", "memory_7b", "trl"]
TRL_INSTALLED = all(importlib.util.find_spec(name) for name in ("trl", "datasets", "pyarrow", "pandas"))


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT, "gpu_check")


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory, tokenizer) -> tuple[dict, dict]:
    """(the JSON printed last, the JSON written to --json-out) of one CPU-mode run."""
    directory = tmp_path_factory.mktemp("gpu-check")
    tokenizer.save_pretrained(directory / "tokenizer")  # spares the subprocess reading the GGUF file again
    env = {**os.environ, "KWANZAA_ADAPTER_CACHE": str(directory / "cache")}
    out = directory / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--budget-s", "240", "--tokenizer",
                           str(directory / "tokenizer"), "--json-out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    lines = done.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{done.stderr[-3000:]}"
    return json.loads(lines[-1]), json.loads(out.read_text())


def stage(report: dict, name: str) -> dict:
    result = report["stages"][name]
    assert result["ok"], f"stage {name} failed: {result['error']}"
    return result


def test_every_stage_runs_on_the_cpu_and_reports_random_weights(cpu_run):
    report, _ = cpu_run
    assert report["device"] == "cpu" and report["weights"].startswith("random")
    assert list(report["stages"]) == STAGES
    for name in STAGES[:-1]:
        stage(report, name)
    if TRL_INSTALLED:
        stage(report, "trl")
        assert report["ok"] is True
    else:  # `make test` installs no bench extras: the stage must say what is missing, not crash the check
        assert "not installed here" in report["stages"]["trl"]["error"]


def test_base_weights_unchanged_by_training(cpu_run):
    workflow = stage(cpu_run[0], "workflow")
    assert workflow["checksums_equal"] is True
    assert workflow["base_digest_before"] == workflow["base_digest_after"]
    assert len(workflow["base_digest_before"]) == 64


def test_workflow_ran_the_gpu_settings_with_the_cpu_optimizer_substitute(cpu_run):
    workflow = stage(cpu_run[0], "workflow")
    assert workflow["steps"] == 3 and workflow["optimizer"] == "adamw_torch"  # paged_adamw_8bit needs CUDA
    assert workflow["real_tokens_per_s"] > 0 and workflow["peak_memory_bytes"] > 0


def test_artifact_verified_and_loaded_through_the_factory(cpu_run):
    report, _ = cpu_run
    assert {"adapter_model.safetensors", "checksums.json", "metadata.json"} <= set(
        stage(report, "verify")["artifact_files"])
    generation = stage(report, "generation")
    assert generation["base_digest_matches_artifact"] is True
    assert generation["batched_tokens"] == generation["prompts"] * generation["new_tokens_each"] > 0
    assert generation["tokens_per_s"] > 0 and generation["peak_memory_bytes"] > 0


def test_memory_measured_beside_the_plan_at_each_length(cpu_run):
    memory = stage(cpu_run[0], "memory_7b")
    assert list(memory["lengths"]) == ["256", "640"]
    for length, figures in memory["lengths"].items():
        assert figures["tokens_per_row"] == int(length) and figures["steps"] == 2
        assert figures["measured_peak_bytes"] > 0 and figures["planned_allocated_bytes"] > 0
        components = figures["planned_components"]
        assert abs(figures["planned_bytes"] - sum(components.values())) <= len(components)  # each rounded
    assert memory["lengths"]["640"]["planned_bytes"] > memory["lengths"]["256"]["planned_bytes"]


@pytest.mark.skipif(not TRL_INSTALLED, reason="TRL and its data stack are bench extras")
def test_trl_recipe_trained_the_same_tokens_as_ours(cpu_run):
    report, _ = cpu_run
    trl = stage(report, "trl")
    assert trl["real_tokens"] == stage(report, "workflow")["real_tokens"]
    assert trl["real_tokens_per_s"] > 0 and trl["ours_real_tokens_per_s"] > 0 and trl["ours_over_trl"] > 0


def test_json_out_holds_the_printed_report(cpu_run):
    printed, written = cpu_run
    assert written == {k: v for k, v in printed.items() if k != "wall_s"}


def test_shapes_are_those_of_the_shipped_model_profiles(gpu_check):
    for shape, profile in ((gpu_check.SMOLLM2_135M, "smollm2.yaml"), (gpu_check.OLMO_7B, "ai2.yaml")):
        declared = yaml.safe_load((ROOT / "configs" / "models" / profile).read_text())["model"]["architecture"]
        assert {k: shape[k] for k in declared if k != "num_parameters"} == \
            {k: v for k, v in declared.items() if k != "num_parameters"}, profile


def _check(gpu_check, tmp_path, seconds: float):
    profile = gpu_check.PROFILES["cpu"]
    return gpu_check.Check(profile, tmp_path, time.monotonic() + seconds, None, tmp_path / "check.json",
                           {"ok": False, "stages": {}})


def test_a_failed_stage_is_recorded_and_the_next_one_still_runs(gpu_check, tmp_path):
    check = _check(gpu_check, tmp_path, 60)

    def broken(check):
        raise ValueError("base weights changed")

    gpu_check.run_stage(check, "workflow", broken)
    gpu_check.run_stage(check, "verify", lambda check: {"figure": 1})
    stages = json.loads((tmp_path / "check.json").read_text())["stages"]
    assert stages["workflow"]["ok"] is False and stages["workflow"]["error"] == "ValueError: base weights changed"
    assert stages["verify"]["ok"] is True and stages["verify"]["figure"] == 1
    assert check.report["ok"] is False


def test_a_stage_past_its_budget_is_stopped_or_skipped(gpu_check, tmp_path):
    check = _check(gpu_check, tmp_path, 60)
    with pytest.raises(gpu_check.BudgetExceeded):
        with gpu_check.time_limit(0.2, "workflow"):
            time.sleep(5)
    late = _check(gpu_check, tmp_path, 1)
    result = gpu_check.run_stage(late, "trl", lambda check: {"figure": 1})
    assert result["ok"] is False and result["error"].startswith("skipped")
    assert gpu_check.run_stage(check, "trl", lambda check: {"figure": 1})["ok"] is True


def test_gradient_checkpointing_goes_by_the_name_this_transformers_knows():
    # The GPU machine's transformers 5.17 refused `activation_checkpointing=` (a TypeError before any step).
    import dataclasses

    from kwanzaa_adapter.training.trainer import checkpointing_arguments

    @dataclasses.dataclass
    class Transformers517Arguments:
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    assert checkpointing_arguments(True, Transformers517Arguments) == {
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    Transformers517Arguments(**checkpointing_arguments(False, Transformers517Arguments))
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(checkpointing_arguments(True)) <= names
