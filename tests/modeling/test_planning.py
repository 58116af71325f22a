"""The dry run's wall-time estimate: its arithmetic, and how close it comes to a real run on this machine."""

from __future__ import annotations

from dataclasses import replace

import json
import time

import pytest

from conftest import ROOT, write_run_config, write_subset
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling import planning

# The estimate is FLOPs over the probe's measured peak at utilisations calibrated on the demo
# (bench/NOTES.md, "ETA"); on a run other than the demo it is held to within this factor.
ETA_FACTOR = 2.0


@pytest.fixture
def demo_config(monkeypatch):
    monkeypatch.chdir(ROOT)
    return load_training_config("configs/demo.yaml")


def test_training_flops_stop_at_the_lowest_adapted_block(demo_config):
    arch = demo_config.model.architecture
    rows = ((460, 110),) * 4

    def with_top_layers(n):
        return demo_config.model_copy(update={"adapter": demo_config.adapter.model_copy(update={"top_layers": n})})

    every = planning.training_flops(with_top_layers(None), arch, rows, checkpointing=False)
    upper = planning.training_flops(with_top_layers(10), arch, rows, checkpointing=False)
    block = planning.block_linear_parameters(arch)
    lora_per_block = 4_884_480 // 30
    # Forward through all 30 blocks either way; input gradients, LoRA and attention backward in 30 or 10.
    per_row = 460 * (2 * block * 20 / 30 + 6 * lora_per_block * 20) + 4 * 576 * 20 * 460**2
    assert every - upper == pytest.approx(4 * per_row, rel=1e-9)
    with_recompute = planning.training_flops(with_top_layers(None), arch, rows, checkpointing=True)
    assert with_recompute > every


def test_generation_decodes_each_batch_as_long_as_its_longest_answer(demo_config):
    arch = demo_config.model.architecture
    rows = ((500, 100), (400, 20), (300, 50))
    _, decode, new_tokens = planning.generation_flops(arch, rows, batch_size=2, max_new_tokens=64)
    assert new_tokens == 64 + 20 + 50  # the first answer capped at max_new_tokens
    _, one_batch, _ = planning.generation_flops(arch, rows, batch_size=3, max_new_tokens=64)
    assert one_batch > decode  # one batch of three decodes 64 steps for every row


def test_estimate_counts_epochs_evaluations_and_both_generation_passes(demo_config):
    arch = demo_config.model.architecture
    train = planning.SplitCounts(((460, 110),) * 223)
    evaluation = planning.SplitCounts(((470, 112),) * 70)
    eta = planning.estimate_time(demo_config, arch, train, evaluation, peak_flops=600e9, precision="bfloat16",
                                 checkpointing=False)
    assert set(eta.phases) == {"load, checksums, artifact", "training", "eval-loss passes", "behavioral evaluation"}
    assert "56 steps" in eta.details["training"] and "102,580 tokens" in eta.details["training"]  # 1 epoch
    assert eta.details["eval-loss passes"].startswith("1 x ")  # eval_steps 79: the final pass only
    twice = planning.estimate_time(demo_config, arch, train, evaluation, 300e9, "bfloat16", False)
    assert twice.total - twice.phases["load, checksums, artifact"] == pytest.approx(
        2 * (eta.total - eta.phases["load, checksums, artifact"]))
    assert "total" in eta.format() and "600 GFLOP/s" in eta.format()


def test_the_fast_engine_prefills_twice_and_decodes_once(demo_config):
    arch = demo_config.model.architecture
    train = planning.SplitCounts(((460, 110),) * 20)
    evaluation = planning.SplitCounts(((300, 100),) * 84)
    settings = dict(peak_flops=765e9, precision="bfloat16", checkpointing=False, gate_prompts=(300,) * 10,
                    gate_depth=20)
    reference = planning.estimate_time(demo_config, arch, train, evaluation, **settings)
    fast = planning.estimate_time(demo_config, arch, train, evaluation, **settings, fast_engine=True)
    limit = demo_config.evaluation.max_new_tokens
    prefill, decode, _ = planning.generation_flops(arch, evaluation.rows, demo_config.evaluation.batch_size, limit)
    # The base answers under the contract's grammar, to the token limit.
    _, base_decode, _ = planning.generation_flops(arch, ((200 + limit, limit),) * 84,
                                                  demo_config.evaluation.batch_size, limit)
    share = planning.FAST_ENGINE_UTILISATION
    derive = planning.DERIVE_SECONDS + planning.DERIVE_SECONDS_PER_PARAMETER * arch.num_parameters
    assert fast.phases["behavioral evaluation"] == pytest.approx(
        derive + (2 * prefill / share["prefill"] + (decode + base_decode) / share["decode"]) / 765e9)
    assert fast.phases["behavioral evaluation"] < reference.phases["behavioral evaluation"] / 2
    assert fast.details["behavioral evaluation"].startswith("llama.cpp: 2 pre-fills x 84 prompts")
    # Prompts that begin alike: the tokens the engine copies instead of computing come off both pre-fills.
    shared = planning.estimate_time(demo_config, arch, train, replace(evaluation, copied=84 * 200 // 4), **settings,
                                    fast_engine=True)
    assert fast.phases["behavioral evaluation"] - shared.phases["behavioral evaluation"] == pytest.approx(
        2 * prefill / 4 / share["prefill"] / 765e9)
    assert "(75% of their tokens computed)" in shared.details["behavioral evaluation"]


def test_a_stale_probe_cache_does_not_reach_the_estimate(tmp_path, tiny_model_dir):
    """The probe cache keeps the precision decision (bf16 or not: a property of the CPU), but a host's speed
    moves: a cached rate 1000x off, for this very machine, must not become the estimate's rate."""
    from kwanzaa_adapter.cli.dryrun import make_plan
    from kwanzaa_adapter.modeling import precision, sources

    config = write_run_config(tmp_path, tiny_model_dir, model={"precision": "auto"})
    fresh = make_plan(str(config), (), str(tmp_path / "out"))
    probe = fresh.precision.probe
    key, identity = precision.cache_key(probe.shape, tuple(probe.gflops), "cpu")
    stale = probe.as_json()
    stale["gflops"] = {k: v * 1000 for k, v in probe.gflops.items()}
    stale["single_thread_gflops"] = {k: v * 1000 for k, v in (probe.single_thread or probe.gflops).items()}
    cache = sources.cache_root() / "precision"
    cache.mkdir(parents=True, exist_ok=True)
    (cache / f"{key}.json").write_text(json.dumps({"format": precision.PROBE_CACHE_FORMAT, "identity": identity,
                                                   "probe": stale}))
    planned = make_plan(str(config), (), str(tmp_path / "out"))
    assert planned.precision.probe_cached and planned.precision.peak_flops > 100 * fresh.eta.peak_flops
    assert planned.eta.peak_flops < 30 * fresh.eta.peak_flops  # measured now: the same machine, give or take load


@pytest.mark.slow
def test_estimate_is_within_a_stated_factor_of_a_real_short_run(tmp_path, monkeypatch):
    """A short run of the demo (the 135M model, 16 rows, 8 steps, 6 eval prompts) against its own dry run."""
    from kwanzaa_adapter.cli.dryrun import make_plan
    from kwanzaa_adapter.training.workflow import train_adapter

    monkeypatch.chdir(ROOT)
    # The product path as `train --dry-run` and `make demo` take it: the estimate measures its rate now,
    # whatever the probe cache holds (test_a_stale_probe_cache_does_not_reach_the_estimate).
    train = write_subset(ROOT / "data/kwanzaa_train.jsonl", tmp_path / "train.jsonl", 16)
    evaluation = write_subset(ROOT / "data/kwanzaa_eval.jsonl", tmp_path / "eval.jsonl", 6)
    overrides = (f"data.train_file={train}", f"data.eval_file={evaluation}", "evaluation.eval_steps=8",
                 "evaluation.max_new_tokens=48", "evaluation.batch_size=6", "checkpointing.save_steps=100",
                 "gate.fit=false", "evidence.fit=false", "evidence.apply=none")  # both read-outs are estimated and measured in make demo
    plan = make_plan("configs/demo.yaml", overrides, str(tmp_path / "out"))
    started = time.perf_counter()
    result = train_adapter("configs/demo.yaml", overrides, str(tmp_path / "out"))
    wall = time.perf_counter() - started
    estimated = plan.eta.total
    measured_training = result.summary["train_runtime"]
    estimated_training = plan.eta.phases["training"] + plan.eta.phases["eval-loss passes"]
    report = (f"wall {wall:.1f} s vs estimated {estimated:.1f} s; training {measured_training:.1f} s vs "
              f"{estimated_training:.1f} s ({plan.precision.resolved})")
    print(report)  # pytest -s shows it: the figure bench/NOTES.md quotes
    assert 1 / ETA_FACTOR <= wall / estimated <= ETA_FACTOR, report
    assert 1 / ETA_FACTOR <= measured_training / estimated_training <= ETA_FACTOR, report
