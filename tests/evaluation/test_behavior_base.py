"""The base column is the base model: when only the base falls back to the reference path (its derivation failed)
while the adapter runs on the fast engine with its gate, the base rows are still written with the adapter
disabled, never by the adapter."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from conftest import build_tiny_model, write_run_config
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.evaluation import behavior
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.evaluation.runs import evaluate
from kwanzaa_adapter.generation.engines import REFERENCE, EngineChoice
from kwanzaa_adapter.generation.gate import AnswerabilityGate
from kwanzaa_adapter.generation.grammar import SchemaGrammar


def test_a_base_that_falls_back_alone_is_still_the_base(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    config = load_training_config(write_run_config(tmp_path, tiny_model_dir, eval_rows=3,
                                                   inference={"engine": "auto"}, evaluation={"max_new_tokens": 48}))
    torch.manual_seed(3)
    model = get_peft_model(build_tiny_model("llama", len(tokenizer)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False)).eval()
    gate = AnswerabilityGate(1, 2.0, torch.zeros(64), torch.zeros(1), torch.zeros(64), torch.ones(64), {})
    fast = EngineChoice(object(), "llama.cpp (f16)")  # the adapter's engine; its runs are stood in for below
    monkeypatch.setattr(behavior, "choose_engines", lambda *a, **k: {
        "base": EngineChoice(None, REFERENCE, "the base's derivation failed"), "adapter": fast})
    monkeypatch.setattr(behavior, "evaluate_with_and_without_gate", lambda model, tokenizer, items, **k: (
        evaluate(model, tokenizer, items, label="adapter", max_new_tokens=48, batch_size=4, progress=False),) * 2)
    report = behavior.measure_behavior(config, model, tokenizer, gate=gate, base_digest="tiny")

    items = load_eval_items(config.data.eval_file, config.data.system_prompt)
    settings = dict(max_new_tokens=48, batch_size=4, progress=False, grammar=SchemaGrammar(tokenizer))
    with model.disable_adapter():
        base = evaluate(model, tokenizer, items, label="base", **settings)
    adapted = evaluate(model, tokenizer, items, label="adapter", **settings)
    outputs = [row["output"] for row in report.base.rows]
    assert outputs == [row["output"] for row in base.rows]
    assert outputs != [row["output"] for row in adapted.rows]  # the adapter writes other answers here
