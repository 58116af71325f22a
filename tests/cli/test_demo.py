"""`make demo`'s own checks: the backend's answer must be a contract answer, and a tampered copy refused."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, load_script

demo = load_script(ROOT / "scripts" / "demo.py", "demo_script")

ANSWER = {
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "Kwanzaa begins on December 26 [1].", "confidence": 0.9, "completeness": "complete"},
    "sources": [{"citation": 1, "title": "Kwanzaa"}],
    "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []},
}


def test_a_contract_answer_is_parsed_and_checked():
    answer = demo.contract_answer(json.dumps({"id": "r1", "answer": ANSWER, "error": None}) + "\n")
    assert answer.cited_numbers() == [1] and answer.answer.completeness == "complete"


@pytest.mark.parametrize("output", [
    json.dumps({"id": "r1", "answer": None, "error": {"type": "invalid_output", "raw_output": "Kwanzaa is"}}),
    json.dumps({"id": "r1", "answer": {**ANSWER, "version": "v0"}, "error": None}),
    json.dumps({"id": "r1", "answer": ANSWER, "error": None}) * 2,
    "",
], ids=["invalid-output", "wrong-version", "two-objects-on-a-line", "nothing"])
def test_an_answer_outside_the_contract_fails_the_demo(output):
    with pytest.raises(ValueError):
        demo.contract_answer(output)


def test_backend_check_fails_when_generate_exits_0_with_an_invalid_answer(monkeypatch, capsys):
    """`generate` exits 0 on an output that is not a contract answer; the demo must not take that as success."""
    invalid = {"id": "r1", "answer": None, "error": {"type": "invalid_output", "message": "not JSON",
                                                     "raw_output": "Kwanzaa is a holiday"}}

    def fake_cli(command):
        print(json.dumps(invalid))
        return 0

    monkeypatch.setattr(demo, "cli", fake_cli)
    monkeypatch.chdir(ROOT)
    assert demo.backend_check("configs/demo.yaml", ROOT / "no-artifact-needed") == 1
    assert "not a contract answer" in capsys.readouterr().err


def test_backend_check_asks_for_the_adapters_own_output_not_the_grammars(monkeypatch, tmp_path):
    """Under the contract's grammar even the untrained base scores json 0.314 (no training needed): the demo's
    answer must parse without it, or it shows nothing the adapter learned. The tampered copy runs the same."""
    commands = []

    def fake_cli(command):
        commands.append(list(command))
        print(json.dumps({"id": "r1", "answer": ANSWER, "error": None}))
        return 0

    monkeypatch.setattr(demo, "cli", fake_cli)
    monkeypatch.chdir(ROOT)
    (tmp_path / "artifact").mkdir()
    (tmp_path / "artifact" / "adapter_model.safetensors").write_bytes(b"weights")  # the copy it tampers with
    demo.backend_check("configs/demo.yaml", tmp_path / "artifact")
    assert len(commands) == 2 and all(c[0] == "generate" and "--no-constrained" in c for c in commands)
