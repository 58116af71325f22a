"""Choosing engines for several variants of one model (generation/engines.py): each derived model is
derived, and checked, once, and what its derivation gave reaches every variant that uses it."""

from __future__ import annotations

import torch

from conftest import write_run_config
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.generation import engines
from kwanzaa_adapter.modeling.derived import DerivationError


def test_each_derived_model_is_derived_once_and_its_outcome_reaches_every_variant(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    config = load_training_config(write_run_config(tmp_path, tiny_model_dir, inference={"engine": "auto"}))
    calls = []

    def derived_gguf(model, tokenizer, *, with_adapter, **options):
        calls.append(with_adapter)
        raise DerivationError(f"cannot convert (adapter {with_adapter})")

    monkeypatch.setattr(engines, "derived_gguf", derived_gguf)
    wanted = {"adapter": (True, None), "gated": (True, 1), "base": (False, None)}
    chosen = engines.choose_engines(config, torch.nn.Linear(2, 2), None, base_digest="0" * 64, wanted=wanted)
    assert sorted(calls) == [False, True]  # once per derived model, not again per variant
    assert {label: choice.name for label, choice in chosen.items()} == dict.fromkeys(wanted, engines.REFERENCE)
    assert chosen["gated"].reason == "cannot convert (adapter True)"
    assert chosen["base"].reason == "cannot convert (adapter False)"


def test_auto_weight_type_is_bf16_with_native_bf16_and_f16_without(monkeypatch):
    """Q8_0 moved the AVX2 class's eval rates 3.67 records from the reference (target 2); f16 1.66."""
    machines = {"avx512": {"flags": ["avx2", "avx512f", "avx512_bf16"], "capability": "AVX512"},
                "avx2": {"flags": ["avx2", "f16c"], "capability": "AVX2"},
                "avx2 on a bf16 CPU": {"flags": ["avx2", "avx512_bf16"], "capability": "AVX2"}}
    picked = {}
    for name, machine in machines.items():
        monkeypatch.setattr(engines, "machine_identity", lambda device, machine=machine: machine)
        picked[name] = engines.resolve_quant("auto")
    assert picked == {"avx512": "bf16", "avx2": "f16", "avx2 on a bf16 CPU": "f16"}
    assert engines.resolve_quant("q8_0") == "q8_0"
