"""Fitting the answerability gate: its choices on training-side data only (decision examples cleared
of eval prompts, folds grouped by question, threshold weighted by the refusal share), and the whole
of it inside the workflow: fitted, saved, sealed, signed with the rest, and applied."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import ROOT, write_subset
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.evaluation.eval_set import eval_prompts, user_turns
from kwanzaa_adapter.generation.gate import GATE_FILE, load_gate
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.gate_fitting import (
    candidate_layers,
    classifier,
    cross_fit,
    load_decision_data,
    question_group,
    weighted_threshold,
)
from kwanzaa_adapter.training.workflow import train_adapter

DECISIONS = ROOT / "data" / "kwanzaa_decisions.jsonl"


def planted(n: int, signal: float, seed: int = 0):
    """Features where refusals sit `signal` apart along one direction, in groups of four."""
    rng = np.random.default_rng(seed)
    refuse = rng.random(n) < 0.4
    features = rng.normal(size=(n, 16))
    features[:, 3] += signal * refuse
    return features, refuse, [f"q{i // 4}" for i in range(n)]


def test_cross_fitting_finds_a_planted_direction_and_not_one_that_is_absent():
    from sklearn.metrics import roc_auc_score

    features, refuse, groups = planted(240, signal=3.0)
    assert roc_auc_score(refuse, cross_fit(features, refuse, groups, 0.05, folds=5)) > 0.95
    noise, refuse, groups = planted(240, signal=0.0)
    assert roc_auc_score(refuse, cross_fit(noise, refuse, groups, 0.05, folds=5)) < 0.7
    fitted = classifier(0.05).fit(features, refuse)
    assert np.argmax(np.abs(fitted[1].coef_[0])) == 3


def test_the_threshold_weighs_each_kind_of_error_by_how_often_it_will_be_met():
    probabilities = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
    refuse = np.array([False, False, True, False, True, True])
    threshold, accuracy = weighted_threshold(probabilities, refuse, prior=0.5)
    assert 0.4 < threshold < 0.6 and accuracy == pytest.approx(1 - 0.5 / 3)  # one answer of three wrong
    # When refusals are rare, refusing the 0.3 one costs less than answering wrongly: the cut moves up.
    rare, _ = weighted_threshold(probabilities, refuse, prior=0.1)
    assert rare > 0.4


def test_auto_candidates_are_the_middle_blocks_and_groups_are_questions():
    assert candidate_layers("auto", 30) == [10, 15, 20]
    assert candidate_layers([20, 5, 20], 30) == [5, 20]
    assert question_group("kwanzaa_origin.q1.gate.same_topic.0") == "kwanzaa_origin.q1"


@pytest.fixture
def gate_config(tmp_path, tiny_run_config):
    decisions = write_subset(DECISIONS, tmp_path / "decisions.jsonl", 36)
    return tiny_run_config(gate={"fit": True, "decision_file": str(decisions), "layers": [1, 2], "folds": 3},
                           evaluation={"behavioral": True, "max_new_tokens": 6})


def test_no_decision_example_shares_a_prompt_with_an_eval_set(tmp_path, tiny_run_config):
    # The first record of the eval split (whose chat form is in the run's eval file) and of the second
    # eval set, copied into the decision file: both must be left out.
    planted_lines = []
    for number, name in enumerate(("kwanzaa_eval_records.jsonl", "kwanzaa_heldout_records.jsonl")):
        record = json.loads((ROOT / "data" / name).read_text(encoding="utf-8").splitlines()[0])
        record = {k: record[k] for k in ("question", "documents", "expect_refusal")}
        planted_lines.append(json.dumps({"id": f"planted{number}.gate.answerable.0", **record}))
    decisions = tmp_path / "decisions.jsonl"
    decisions.write_text("".join(DECISIONS.read_text().splitlines(keepends=True)[:12]) + "\n".join(planted_lines) + "\n")
    config = load_training_config(tiny_run_config(gate={
        "fit": True, "decision_file": str(decisions),
        "exclude_files": [str(ROOT / "data" / "kwanzaa_heldout_records.jsonl")]}))
    data = load_decision_data(config)
    assert data.skipped == {"in_an_eval_set": 2} and len(data.items) == 12
    held_out = eval_prompts(config.data.eval_file, config.data.system_prompt) | eval_prompts(
        ROOT / "data" / "kwanzaa_heldout_records.jsonl", config.data.system_prompt)
    assert not any(user_turns(item) in held_out for item in data.items)


def test_the_workflow_fits_saves_seals_and_applies_the_gate(gate_config, tmp_path):
    result = train_adapter(gate_config)
    artifact = result.artifact_dir
    gate = load_gate(artifact)
    assert gate is not None and gate.layer in (1, 2) and gate.weight.abs().sum() > 0
    manifest = json.loads((artifact / "checksums.json").read_text())
    assert GATE_FILE in manifest["files"]
    metadata = json.loads((artifact / "metadata.json").read_text())
    described = metadata["gate"]
    assert described["file"] == GATE_FILE and described["layer"] == gate.layer
    assert described["threshold"] == pytest.approx(gate.threshold, abs=1e-4) and described["examples"] == 36
    assert 0.0 <= described["calibration_auc"] <= 1.0 and len(described["candidates"]) == 2 * 3
    assert metadata["timings"]["gate_seconds"] > 0
    card = (artifact / "README.md").read_text()
    assert "## Answerability gate" in card and f"block {gate.layer}" in card and "calibration AUC" in card
    # The behavioral evaluation ran the adapter with and without its gate.
    assert result.behavior.gated is not None and set(result.behavior.as_json()) >= {"adapter", "adapter_gate"}
    assert all(row["decision"] in ("answer", "refuse") for row in result.behavior.gated.rows)
    assert all(row["decision"] is None for row in result.behavior.adapter.rows)

    # The backend reads it from the verified artifact; gate.apply=false leaves it out.
    served = model_from_config(load_training_config(gate_config), adapter=artifact)
    assert served.gate is not None and served.gate.threshold == gate.threshold
    replies = served.answer_prompts([[{"role": "user", "content": "When is Kwanzaa?"}]], max_new_tokens=4)
    assert replies[0].gate["decision"] in ("answer", "refuse") and "gate" in replies[0].to_json()
    off = model_from_config(load_training_config(gate_config, ("gate.apply=false",)), adapter=artifact)
    assert off.gate is None and off.answer_prompts([[{"role": "user", "content": "Hi"}]], 4)[0].gate is None

    # A changed gate file fails verification.
    data = bytearray((artifact / GATE_FILE).read_bytes())
    data[-1] ^= 0x01
    (artifact / GATE_FILE).write_bytes(bytes(data))
    report = verify_artifact(artifact)
    assert not report.ok and GATE_FILE in report.format()


def test_training_and_eval_run_the_gated_evaluation_on_the_fast_engine(gate_config, tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")
    fast = ("inference.engine=llama.cpp", "inference.quant=f16", f"inference.cache_dir={tmp_path / 'cache'}")
    result = train_adapter(gate_config, fast)
    report = result.behavior
    assert {run.engine for run in report.runs} == {"llama.cpp (f16)", "lexical"} and report.gated is not None
    derived = report.as_json()["engine"]["adapter"]["derived"]["derives_from"]
    assert derived["adapter_digest"] and derived["base_digest"]  # from the base checked against the baseline
    metadata = json.loads((result.artifact_dir / "metadata.json").read_text())
    assert metadata["final_metrics"]["behavioral"]["engine"]["base"]["engine"] == "llama.cpp (f16)"

    # The same artifact evaluated by `eval` on both paths: the same outputs and decisions, row by row.
    from kwanzaa_adapter.backend.models import causal_lm

    backend_engines, choose = [], causal_lm.choose_engine
    monkeypatch.setattr(causal_lm, "choose_engine", lambda *a, **k: backend_engines.append(k) or choose(*a, **k))
    outputs = {}
    for engine in ("reference", "llama.cpp"):
        out = tmp_path / engine / "metrics.json"
        assert main(["eval", "--config", str(gate_config), "--adapter", str(result.artifact_dir), "--output",
                     str(out), "--set", f"inference.engine={engine}", "--set", "inference.quant=f16", "--set",
                     f"inference.cache_dir={tmp_path / 'cache'}"]) == 0
        rows = [json.loads(line) for line in (out.parent / "eval_predictions.jsonl").read_text().splitlines()]
        assert {row["engine"] for row in rows} == {"reference" if engine == "reference" else "llama.cpp (f16)",
                                                   "lexical"}
        outputs[engine] = [(row["model"], row["id"], row["output"], row["decision"]) for row in rows]
    assert outputs["llama.cpp"] == outputs["reference"]
    assert backend_engines == []  # eval chooses an engine per variant; the backend model derives none of its own
