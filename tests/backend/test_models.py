"""The model factory and its models on tiny 4-bit models: verified adapters, answers, chat, CLI."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from conftest import ROOT, build_tiny_model
from kwanzaa_adapter.backend.models import (
    MODEL_REGISTRY,
    AI2Model,
    AnswerResult,
    BaseModelMismatchError,
    CausalLMModel,
    ModelFamilyError,
    UnknownModelError,
    create_model,
    model_from_config,
)
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.cli.console import run_chat
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.contract import Answer
from kwanzaa_adapter.data.records import Document
from kwanzaa_adapter.modeling.loading import AdapterVerificationError
from tiny_artifact import copy_artifact, flip_last_byte, other_base_dir, tiny_artifact, write_records  # noqa: F401

DOCUMENTS = [Document(title="Kwanzaa", text="Kwanzaa is celebrated from December 26 to January 1.")]
VALID = Answer.model_validate({
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "From December 26 to January 1 [1].", "confidence": 0.9, "completeness": "complete"},
    "sources": [{"citation": 1, "title": "Kwanzaa"}],
    "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []},
}).to_json()


@pytest.fixture
def loaded(tiny_artifact):
    config, artifact = tiny_artifact
    return create_model("causal_lm", load_training_config(config), adapter=artifact)


def test_unknown_model_name_lists_the_registered_ones(tiny_artifact):
    config = load_training_config(tiny_artifact[0])
    with pytest.raises(UnknownModelError, match="'gpt-9'; registered models: ai2, causal_lm"):
        create_model("gpt-9", config)


@pytest.mark.parametrize("profile", sorted((ROOT / "configs" / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_model_profile_names_a_registered_model(profile):
    family = yaml.safe_load(profile.read_text())["model"]["family"]
    assert family in MODEL_REGISTRY


def test_ai2_profile_builds_the_ai2_model():
    assert yaml.safe_load((ROOT / "configs/models/ai2.yaml").read_text())["model"]["family"] == "ai2"
    assert MODEL_REGISTRY["ai2"] is AI2Model and issubclass(AI2Model, CausalLMModel)


def test_verified_adapter_loads_on_its_own_base(loaded, tiny_artifact):
    info = loaded.adapter
    assert info.base_digest_matches and info.trained_base_digest == loaded.base_digest
    assert info.version == "0.1.0" and info.verification.startswith("OK ")
    assert loaded.name == "tiny-v0.1.0"
    assert type(loaded.model).__name__ == "PeftModelForCausalLM"
    assert loaded.describe()["quantization"] == "4-bit nf4"


def test_base_digest_matches_the_training_baseline(loaded, tiny_artifact):
    baseline = json.loads((tiny_artifact[1].parents[0] / "baseline_checksums.json").read_text())
    assert loaded.base_digest == baseline["model_digest"]


def test_flipped_byte_is_refused_with_the_verification_diff(tiny_artifact, tmp_path):
    config, artifact = tiny_artifact
    copy = copy_artifact(artifact, tmp_path / "artifact")
    flip_last_byte(copy / "adapter_model.safetensors")
    with pytest.raises(AdapterVerificationError, match=r"mismatched\s+adapter_model.safetensors"):
        model_from_config(load_training_config(config), adapter=copy)


def test_incomplete_artifact_is_refused_naming_the_missing_file(tiny_artifact, tmp_path):
    config, artifact = tiny_artifact
    copy = copy_artifact(artifact, tmp_path / "artifact")
    (copy / "adapter_config.json").unlink()
    with pytest.raises(AdapterVerificationError, match=r"missing\s+adapter_config.json"):
        model_from_config(load_training_config(config), adapter=copy)


def test_other_base_model_is_refused_unless_overridden(tiny_artifact, other_base_dir):
    config_path, artifact = tiny_artifact
    config = load_training_config(config_path, (f"model.name_or_path={other_base_dir}",))
    with pytest.raises(BaseModelMismatchError, match="--allow-base-mismatch"):
        model_from_config(config, adapter=artifact)
    model = model_from_config(config, adapter=artifact, allow_base_mismatch=True)
    assert not model.adapter.base_digest_matches


def test_ai2_model_refuses_a_non_olmo_base(tiny_artifact):
    config = load_training_config(tiny_artifact[0], ("model.family=ai2",))
    with pytest.raises(ModelFamilyError, match="'llama' model; set model.family: causal_lm"):
        model_from_config(config)


def test_ai2_model_serves_an_olmo_base(tmp_path, tokenizer, tiny_artifact):
    build_tiny_model("olmo", len(tokenizer)).save_pretrained(tmp_path / "olmo")
    tokenizer.save_pretrained(tmp_path / "olmo")
    config = load_training_config(tiny_artifact[0], ("model.family=ai2", f"model.name_or_path={tmp_path / 'olmo'}",
                                                      "evaluation.max_new_tokens=3"))
    model = model_from_config(config)
    assert isinstance(model, AI2Model) and model.adapter is None
    assert model.answer("When is Kwanzaa?", DOCUMENTS).raw_output is not None


def test_answer_result_holds_a_contract_answer_or_the_raw_output():
    good = AnswerResult.from_output(VALID)
    assert good.ok and good.to_json()["answer"]["sources"] == [{"citation": 1, "title": "Kwanzaa"}]
    bad = AnswerResult.from_output("The answer is 26 December.")
    assert bad.to_json() == {"answer": None, "error": {
        "type": "invalid_output", "message": bad.error, "raw_output": "The answer is 26 December."}}


def test_prompt_is_the_training_rendering(loaded):
    from kwanzaa_adapter.data.records import RagRecord, render_record

    record = RagRecord(id="x", question="When is Kwanzaa?", documents=DOCUMENTS, expect_refusal=False)
    assert loaded.prompt_for("When is Kwanzaa?", DOCUMENTS) == render_record(record, loaded.config.data.system_prompt)


def test_batched_answers_come_back_in_order_with_raw_outputs(loaded):
    prompts = [loaded.prompt_for(q, DOCUMENTS) for q in ("When is Kwanzaa?", "Who?", "What is the kinara made of?")]
    results = loaded.answer_prompts(prompts, max_new_tokens=4)
    assert len(results) == 3 and all(isinstance(r, AnswerResult) for r in results)
    assert all(r.ok or r.error for r in results)
    assert not loaded.lock.locked()


def test_streamed_chat_pieces_join_to_the_decoded_reply(loaded):
    stream = loaded.stream_chat([{"role": "user", "content": "Hello"}], max_new_tokens=6)
    pieces = list(stream)
    assert "".join(pieces) == stream.text
    assert stream.completion_tokens <= 6 and stream.finish_reason in ("stop", "length")
    assert stream.prompt_tokens > 0
    assert not loaded.lock.locked()


def test_generate_prints_one_json_line_per_record(tiny_artifact, tmp_path, capsys):
    config, artifact = tiny_artifact
    records = write_records(tmp_path / "records.jsonl", 2)
    assert main(["generate", "--config", str(config), "--adapter", str(artifact), "--input", str(records),
                 "--set", "evaluation.max_new_tokens=4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ids = [json.loads(line)["id"] for line in records.read_text().splitlines()]
    assert [line["id"] for line in lines] == ids
    for line in lines:
        assert set(line) == {"id", "answer", "error"}
        assert (line["answer"] is None) != (line["error"] is None)
        if line["error"] is not None:
            assert line["error"]["type"] == "invalid_output" and "raw_output" in line["error"]


def test_generate_with_flipped_byte_exits_1_naming_the_file(tiny_artifact, tmp_path, capsys):
    config, artifact = tiny_artifact
    copy = copy_artifact(artifact, tmp_path / "artifact")
    flip_last_byte(copy / "adapter_model.safetensors")
    records = write_records(tmp_path / "records.jsonl", 1)
    assert main(["generate", "--config", str(config), "--adapter", str(copy), "--input", str(records)]) == 1
    captured = capsys.readouterr()
    assert "mismatched  adapter_model.safetensors" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "question": "q"}\n', "records.jsonl:1"),
    ("not json\n", "records.jsonl:1: not a JSON line"),
    ("", "no records to answer"),
])
def test_generate_with_bad_input_exits_2_naming_it(tiny_artifact, tmp_path, capsys, content, message):
    records = tmp_path / "records.jsonl"
    records.write_text(content)
    assert main(["generate", "--config", str(tiny_artifact[0]), "--input", str(records)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_with_unknown_family_exits_2_listing_the_registry(tiny_artifact, tmp_path, capsys):
    records = write_records(tmp_path / "records.jsonl", 1)
    assert main(["generate", "--config", str(tiny_artifact[0]), "--input", str(records),
                 "--set", "model.family=gpt"]) == 2
    assert "registered models: ai2, causal_lm" in capsys.readouterr().err


def test_chat_streams_answers_over_a_documents_file(tiny_artifact, tmp_path, capsys, monkeypatch):
    config, artifact = tiny_artifact
    documents = tmp_path / "documents.json"
    documents.write_text(json.dumps({"documents": [d.model_dump(exclude_none=True) for d in DOCUMENTS]}))
    monkeypatch.setattr("sys.stdin", io.StringIO("When is Kwanzaa?\n\nWho?\n/quit\nnever asked\n"))
    assert main(["chat", "--config", str(config), "--adapter", str(artifact), "--documents", str(documents),
                 "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "tiny-v0.1.0: 1 document(s)" in out
    assert out.count(" tokens in ") == 2  # one status line an answer, not a TTY: no styles
    assert "\x1b[" not in out


def test_chat_with_a_bad_documents_file_exits_2_naming_it(tiny_artifact, tmp_path, capsys):
    documents = tmp_path / "documents.json"
    documents.write_text(json.dumps([{"title": "no text"}]))
    assert main(["chat", "--config", str(tiny_artifact[0]), "--documents", str(documents)]) == 2
    err = capsys.readouterr().err
    assert "documents.json: 0.text" in err and "Traceback" not in err



def test_chat_question_beyond_the_context_window_is_reported_and_the_session_goes_on(loaded):
    window = loaded.model.config.max_position_embeddings
    written = []
    questions = iter(["Kwanzaa " * window, "Short?"])

    def read(prompt: str) -> str:
        try:
            return next(questions)
        except StopIteration:
            raise EOFError from None

    asked = run_chat(loaded, DOCUMENTS, read, written.append, max_new_tokens=2)
    output = "".join(written)
    assert asked == 1 and "[not asked: the prompt is" in output and f"context window is {window} tokens" in output


def test_eval_applies_the_backends_base_digest_check(tiny_artifact, other_base_dir, capsys):
    """`eval` loads the adapter as the backend does: onto another base it is refused (exit 1), unless overridden."""
    config_path, artifact = tiny_artifact
    command = ["eval", "--config", str(config_path), "--adapter", str(artifact),
               "--set", f"model.name_or_path={other_base_dir}", "--set", "evaluation.max_new_tokens=2",
               "--set", "evaluation.max_examples=1"]
    assert main(command) == 1
    assert "was trained on base model" in capsys.readouterr().err
    assert main([*command, "--allow-base-mismatch"]) == 0
    assert "base model digest differs" in capsys.readouterr().err
