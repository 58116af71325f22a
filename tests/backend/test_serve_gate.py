"""The answerability gate in the backend: both HTTP routes apply it and say what it decided; a client's
own response_format keeps it out, and the reply says so; `generate` prints its decision per line."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch

from helpers import DOCUMENT, running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.cli import main as cli
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.generation.gate import GATE_FILE, AnswerabilityGate
from kwanzaa_adapter.safety.artifacts import seal_artifact
from tiny_artifact import tiny_artifact  # noqa: F401

LIMITS = ServeLimits(max_new_tokens=8)


@pytest.fixture(scope="module")
def gated_artifact(tiny_artifact, tmp_path_factory):
    """The tiny artifact with a gate that refuses everything (threshold below any probability), resealed."""
    config, artifact = tiny_artifact
    copy = tmp_path_factory.mktemp("gated") / "final_artifact"
    shutil.copytree(artifact, copy)
    width = 64
    AnswerabilityGate(1, -1.0, torch.ones(width), torch.zeros(1), torch.zeros(width), torch.ones(width),
                      {"calibration_auc": 0.5}).save(copy / GATE_FILE)
    seal_artifact(copy)
    return config, copy


@pytest.fixture(scope="module")
def server(gated_artifact):
    config, artifact = gated_artifact
    model = model_from_config(load_training_config(config), adapter=artifact)
    assert model.gate is not None
    with running(create_app(model, LIMITS)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_the_answer_route_applies_the_gate_and_reports_its_decision(server):
    body = server.post("/v1/answer", json={"question": "When is Kwanzaa?", "documents": [DOCUMENT]}).json()
    assert body["gate"]["decision"] == "refuse" and 0.0 <= body["gate"]["refuse_probability"] <= 1.0
    assert server.get("/healthz").json()["gate"]["layer"] == 1


def test_the_chat_route_says_why_the_gate_did_not_act_on_free_text_or_a_clients_own_format(server):
    messages = [{"role": "user", "content": "When is Kwanzaa?"}]
    plain = server.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6}).json()
    # The tiny random model writes free text: a decision the gate made could not act, and the reply says so.
    assert plain["gate"]["applied"] is False and "free text" in plain["gate"]["reason"]
    assert "decision" not in plain["gate"]
    own = server.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6,
                                                     "response_format": {"type": "json_object"}}).json()
    assert own["gate"] == {"applied": False, "reason": "the request brings its own response_format"}


def test_generate_prints_the_gate_decision_and_gate_apply_false_turns_it_off(gated_artifact, tmp_path, capsys):
    config, artifact = gated_artifact
    record = tmp_path / "record.jsonl"
    record.write_text(json.dumps({"id": "r1", "question": "When is Kwanzaa?", "documents": [DOCUMENT],
                                  "expect_refusal": False}) + "\n")
    command = ["generate", "--config", str(config), "--adapter", str(artifact), "--input", str(record),
               "--set", "evaluation.max_new_tokens=4", "--json"]
    assert cli(command) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["gate"]["decision"] == "refuse"
    assert cli([*command, "--set", "gate.apply=false"]) == 0
    assert "gate" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_chat_streams_under_the_gate_and_reports_its_decision(gated_artifact):
    config, artifact = gated_artifact
    model = model_from_config(load_training_config(config), adapter=artifact)
    stream = model.stream_chat(model.prompt_for("When is Kwanzaa?", []), max_new_tokens=4)
    "".join(stream)
    assert stream.gate_result["decision"] == "refuse"
    ungated = model.stream_chat(model.prompt_for("When is Kwanzaa?", []), max_new_tokens=4, gated=False)
    "".join(ungated)
    assert ungated.gate_result is None


@pytest.mark.parametrize("attack", ["swapped", "removed"])
def test_a_gate_swapped_while_the_adapter_loads_is_refused(gated_artifact, tmp_path, monkeypatch, attack):
    """The gate is read after the base model and the adapter load (minutes for a 7B): a gate swapped then, or
    removed, must not decide; the bytes used are the bytes verified, read once."""
    from peft import PeftModel

    from kwanzaa_adapter.safety.artifacts import SealedFileChangedError

    config, artifact = gated_artifact
    copy = tmp_path / "final_artifact"
    shutil.copytree(artifact, copy)
    load_adapter = PeftModel.from_pretrained.__func__

    def swap_then_load(cls, *args, **kwargs):
        if attack == "removed":
            (copy / GATE_FILE).unlink()
        else:  # a gate that answers everything
            AnswerabilityGate(1, 2.0, torch.zeros(64), torch.zeros(1), torch.zeros(64), torch.ones(64),
                              {"calibration_auc": 0.5}).save(copy / GATE_FILE)
        return load_adapter(cls, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "from_pretrained", classmethod(swap_then_load))
    with pytest.raises(SealedFileChangedError, match=GATE_FILE):
        model_from_config(load_training_config(config), adapter=copy)
