"""`model.precision`: the decision from the probe's figures, the per-machine cache, the warning, the record."""

from __future__ import annotations

import json
import logging

import bitsandbytes as bnb
import pytest
import torch

from conftest import write_run_config
from kwanzaa_adapter.backend.models import create_model
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.modeling import precision as P
from kwanzaa_adapter.safety.checksums import compute_model_state_checksum
from kwanzaa_adapter.training.workflow import train_adapter

SHAPE = (64, 576, 1536)  # SmolLM2-135M's up-projection over 64 tokens
# Figures measured on 2-core machines of both classes (bench/NOTES.md, "Precision").
AMX = {"float32": 300.0, "bfloat16": 880.0}
AVX2 = {"float32": 135.6, "bfloat16": 0.9}


def injected(gflops: dict, calls: list | None = None):
    """A stand-in for `measure_products` that returns the given figures and counts its calls."""

    def measure(shape, dtypes, device="cpu"):
        if calls is not None:
            calls.append((shape, dtypes))
        return P.MatmulProbe(tuple(shape), {d: gflops[d] for d in dtypes}, torch.get_num_threads(), 0.01)

    return measure


def test_auto_takes_bf16_where_the_probe_shows_it_clearly_faster():
    decision = P.resolve_precision("auto", "cpu", SHAPE, measure=injected(AMX))
    assert decision.resolved == "bfloat16" and decision.dtype == torch.bfloat16
    assert "2.93x" in decision.reason and decision.peak_flops == 880e9


def test_auto_takes_fp32_where_bf16_is_emulated():
    decision = P.resolve_precision("auto", "cpu", SHAPE, measure=injected(AVX2))
    assert decision.resolved == "float32" and decision.warning is None
    assert "1/151 of fp32" in decision.reason and "emulated" in decision.reason
    assert decision.peak_flops == 135.6e9


def test_auto_keeps_fp32_when_bf16_is_only_marginally_faster():
    decision = P.resolve_precision("auto", "cpu", SHAPE, measure=injected({"float32": 100.0, "bfloat16": 115.0}))
    assert decision.resolved == "float32" and "not clearly faster" in decision.reason


def test_explicit_fp32_on_the_cpu_needs_no_probe():
    decision = P.resolve_precision("float32", "cpu", SHAPE, measure=injected({}, calls := []))
    assert decision.resolved == "float32" and decision.probe is None and calls == []


@pytest.mark.parametrize(("supported", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_cuda_auto_follows_the_gpu_bf16_support_without_a_probe(supported, expected):
    calls = []
    decision = P.resolve_precision("auto", "cuda", SHAPE, cuda_bf16=lambda: supported, measure=injected({}, calls))
    assert decision.resolved == expected and decision.probe is None and calls == []
    explicit = P.resolve_precision("float32", "cuda", SHAPE, cuda_bf16=lambda: supported)
    assert explicit.resolved == "float32"


def test_cuda_planned_on_a_machine_without_one_assumes_bf16():
    decision = P.resolve_precision("auto", "cuda", SHAPE, cuda_bf16=lambda: None)
    assert decision.resolved == "bfloat16" and "no GPU here" in decision.reason


def test_explicit_bf16_on_an_emulating_cpu_runs_with_one_warning_giving_the_factor(caplog, monkeypatch):
    monkeypatch.setattr(P, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="kwanzaa_adapter.modeling.precision"):
        first = P.resolve_precision("bfloat16", "cpu", SHAPE, measure=injected(AVX2))
        second = P.resolve_precision("bfloat16", "cpu", SHAPE, measure=injected(AVX2))
    assert first.resolved == second.resolved == "bfloat16"
    assert "151x slower than float32" in first.warning and "0.9 vs 135.6 GFLOP/s" in first.warning
    assert [r.getMessage() for r in caplog.records] == [first.warning]  # once per process


def test_explicit_bf16_on_a_fast_cpu_gives_no_warning():
    decision = P.resolve_precision("bfloat16", "cpu", SHAPE, measure=injected(AMX))
    assert decision.resolved == "bfloat16" and decision.warning is None


def test_probe_is_cached_per_machine(tmp_path, monkeypatch):
    calls = []
    first = P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=injected(AMX, calls))
    second = P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=injected(AVX2, calls))
    assert len(calls) == 1 and (first.probe_cached, second.probe_cached) == (False, True)
    assert second.resolved == "bfloat16" and second.probe == first.probe  # the cached figures, not new ones
    # Kernels restricted to AVX2 (how bench/NOTES.md reproduces the AVX2 class), fewer threads, another
    # shape: each is another machine as far as products go, and is measured again.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=injected(AVX2, calls)).resolved \
        == "float32"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=injected(AVX2, calls))
    finally:
        torch.set_num_threads(threads)
    P.resolve_precision("auto", "cpu", (64, 64, 128), cache_dir=tmp_path, measure=injected(AVX2, calls))
    assert len(calls) == 4 and len(list(tmp_path.glob("*.json"))) == 4


def test_a_busy_machine_decides_by_the_single_thread_rates_and_is_not_cached(tmp_path):
    """All threads at once are slowed by other work far more than one thread; the probe decides by the one
    thread and keeps no figures measured that way (bench/NOTES.md: 4 vs 14 GFLOP/s on two busy threads,
    164 vs 385 on one)."""
    busy = P.MatmulProbe(SHAPE, {"float32": 4.1, "bfloat16": 3.9}, 2, 0.5, {"float32": 164.2, "bfloat16": 385.3})
    calls = []

    def measure(shape, dtypes, device="cpu"):
        calls.append(shape)
        return busy

    decision = P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=measure)
    assert busy.contended and decision.resolved == "bfloat16" and "2.35x" in decision.reason
    assert decision.peak_flops == 385.3e9  # the one thread's rate: the busy pair's is no run's peak
    assert list(tmp_path.iterdir()) == []
    P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=measure)
    assert len(calls) == 2  # measured again, not read from a cache


def test_an_emulated_kernel_gaining_nothing_from_threads_is_no_sign_of_a_busy_machine(tmp_path):
    """The AVX2 class's probe (the demo's metadata): bf16 1.83 on two threads, 1.93 on one; fp32 scales."""
    quiet = P.MatmulProbe(SHAPE, {"float32": 94.0, "bfloat16": 1.83}, 2, 0.5, {"float32": 73.4, "bfloat16": 1.93})
    decision = P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path,
                                   measure=lambda shape, dtypes, device="cpu": quiet)
    assert not quiet.contended and decision.resolved == "float32"
    assert len(list(tmp_path.glob("*.json"))) == 1  # cached


@pytest.mark.parametrize("content", ["not json", '{"format": "other"}', '{"format": "kwanzaa.precision-probe.v1"}'])
def test_unreadable_or_foreign_cache_is_measured_again_and_replaced(tmp_path, content):
    key, _ = P.cache_key(SHAPE, ("float32", "bfloat16"))
    (tmp_path / f"{key}.json").write_text(content)
    calls = []
    decision = P.resolve_precision("auto", "cpu", SHAPE, cache_dir=tmp_path, measure=injected(AVX2, calls))
    assert len(calls) == 1 and not decision.probe_cached and decision.resolved == "float32"
    record = json.loads((tmp_path / f"{key}.json").read_text())
    assert record["probe"]["gflops"] == AVX2


def test_real_probe_measures_both_dtypes_in_a_fraction_of_a_second():
    probe = P.measure_products(SHAPE)
    assert set(probe.gflops) == {"float32", "bfloat16"} and min(probe.gflops.values()) > 0
    if torch.get_num_threads() > 1:
        assert set(probe.single_thread) == {"float32", "bfloat16"}
    assert P.MatmulProbe.from_json(probe.as_json()).as_json() == probe.as_json()
    # Quiet, both thread settings take ~0.5 s (an emulated bf16 kernel ~0.1 s for each of its two products of
    # this shape); the bound leaves room for a busy machine.
    assert probe.seconds < 2.5, probe
    assert probe.threads == torch.get_num_threads()


def test_run_records_the_probe_and_decision_in_metadata(tmp_path, tiny_model_dir, monkeypatch):
    """auto on an (injected) emulating CPU: the run trains in fp32 and metadata.json says why."""
    monkeypatch.setenv("KWANZAA_ADAPTER_CACHE", str(tmp_path / "cache"))
    shape = P.probe_shape(64, 128)  # the tiny Llama's width and MLP width
    key, identity = P.cache_key(shape, ("float32", "bfloat16"))
    cache = tmp_path / "cache" / "precision"
    cache.mkdir(parents=True)
    probe = P.MatmulProbe(shape, AVX2, torch.get_num_threads(), 0.3)
    (cache / f"{key}.json").write_text(json.dumps(
        {"format": P.PROBE_CACHE_FORMAT, "identity": identity, "probe": probe.as_json()}))
    config = write_run_config(tmp_path, tiny_model_dir, model={"precision": "auto"})
    result = train_adapter(config)
    record = json.loads((result.artifact_dir / "metadata.json").read_text())["precision"]
    assert record["setting"] == "auto" and record["resolved"] == "float32" and record["probe_cached"] is True
    assert record["probe"]["gflops"] == AVX2 and "emulated" in record["reason"]
    card = (result.artifact_dir / "README.md").read_text()
    assert "| precision | float32 (auto: bf16 products 1/151 of fp32" in card


def test_backend_verifies_a_bf16_trained_base_then_computes_in_this_machines_precision(tmp_path, tiny_model_dir):
    """Trained in bf16, served where fp32 is the precision: the digest is checked on the base loaded as it
    was trained, then the base computes in fp32 (an exact widening of its bf16 weights)."""
    config = write_run_config(tmp_path, tiny_model_dir, model={"precision": "bfloat16"},
                              quantization={"upcast_unquantized": False})
    result = train_adapter(config)
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    assert metadata["precision"]["resolved"] == "bfloat16"
    served = create_model("causal_lm", load_training_config(config, ["model.precision=float32"]),
                          adapter=result.artifact_dir)
    assert served.adapter.base_digest_matches and served.base_digest == metadata["base_model"]["model_digest"]
    base = {n: p for n, p in served.model.named_parameters() if "lora_" not in n and p.is_floating_point()}
    assert {p.dtype for p in base.values()} == {torch.float32}
    layers = [m for m in served.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.float32}
    assert served.answer_prompts([served.prompt_for("When is Kwanzaa?", [])], max_new_tokens=4)
    # Loaded in fp32 from the start instead, the same base has another digest: it is another 4-bit model.
    other = create_model("causal_lm", load_training_config(config, ["model.precision=float32"]))
    assert other.base_digest != metadata["base_model"]["model_digest"]
    assert compute_model_state_checksum(other.model)["model_digest"] == other.base_digest
