"""The preference stage (training.preference): mining, pairs, DPO on the tiny 4-bit model, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import ROOT, write_run_config, write_subset
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.generation.decoding import GenerationResult
from kwanzaa_adapter.modeling.loading import load_base_model
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.safety.checksums import compute_model_state_checksum
from kwanzaa_adapter.training.preference import (
    ERROR_KINDS,
    PAIRS_FILE,
    check_preference_data,
    load_mining_set,
    mine,
)
from kwanzaa_adapter.training.workflow import train_adapter
from reliability.crash import checkpoint_state, resume_problems

# Eight pairs at two per micro-batch: four DPO steps, checkpoints at 2 and 4.
PREFERENCE = {"enabled": True, "mining_examples": 8, "num_epochs": 1, "gradient_accumulation_steps": 1,
              "learning_rate": 1e-2, "beta": 0.1}


def scripted(outputs_by_prompt: dict):
    """A stand-in for evaluation.generate that answers each prompt with a planted output."""

    def generate(model, tokenizer, prompts, **options):
        return GenerationResult([outputs_by_prompt[json.dumps(p)] for p in prompts], 1, 0.1)

    return generate


def _edit(reference: str, change) -> str:
    answer = json.loads(reference)
    change(answer)
    return json.dumps(answer)


def _refusal_of(items) -> str:
    return next(item.reference for item in items if item.example.expect_refusal)


def _answer_of(items) -> str:
    return next(item.reference for item in items if not item.example.expect_refusal)


def test_mining_finds_the_planted_errors_and_only_them(tmp_path):
    train = write_subset(ROOT / "data/kwanzaa_train.jsonl", tmp_path / "train.jsonl", 24)
    evaluation = write_subset(ROOT / "data/kwanzaa_eval.jsonl", tmp_path / "eval.jsonl", 4)
    items = load_mining_set(train, evaluation, "unused").items
    answerable = [item for item in items if not item.example.expect_refusal]
    unanswerable = [item for item in items if item.example.expect_refusal]
    assert len(answerable) >= 5 and unanswerable
    planted = {
        answerable[0].id: ("malformed", "Kwanzaa was created in 1966."),
        unanswerable[0].id: ("answered_unanswerable", _answer_of(items)),
        answerable[1].id: ("refused_answerable", _refusal_of(items)),
        answerable[2].id: ("miscited", _edit(answerable[2].reference,
                                             lambda a: a["sources"].append({**a["sources"][0], "citation": 9}))),
        answerable[3].id: ("ungrounded", _edit(answerable[3].reference, lambda a: a["answer"].update(
            text=f"Pianists improvised melodies across crowded ballrooms nightly [{a['sources'][0]['citation']}]."))),
    }
    outputs = {json.dumps(item.prompt): planted[item.id][1] if item.id in planted else item.reference
               for item in items}
    pairs, _ = mine(None, None, items, max_new_tokens=8, batch_size=4, generate_fn=scripted(outputs))
    assert {pair.id: pair.kind for pair in pairs} == {key: kind for key, (kind, _) in planted.items()}
    assert {kind for kind, _ in planted.values()} == set(ERROR_KINDS)
    for pair in pairs:
        gold = next(item for item in items if item.id == pair.id)
        assert pair.chosen == gold.reference and pair.rejected == planted[pair.id][1] and pair.prompt == gold.prompt


def test_pairs_never_come_from_the_eval_split(tmp_path):
    train = write_subset(ROOT / "data/kwanzaa_train.jsonl", tmp_path / "train.jsonl", 10)
    evaluation = write_subset(ROOT / "data/kwanzaa_eval.jsonl", tmp_path / "eval.jsonl", 4)
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(train.read_text() + "".join(evaluation.read_text().splitlines(keepends=True)[:2]))
    mining = load_mining_set(leaked, evaluation, "unused")
    eval_ids = {json.loads(line)["meta"]["id"] for line in evaluation.read_text().splitlines()}
    assert len(mining.items) == 10 and mining.skipped == {"in_eval_split": 2}
    assert not {item.id for item in mining.items} & eval_ids


def test_the_eval_file_as_mining_file_fails_step_one_with_exit_2(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": {
        **PREFERENCE, "mining_file": str(tmp_path / "eval.jsonl")}})
    assert main(["train", "--config", str(config)]) == 2
    assert "training.preference.mining_file" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(("setting", "expected"), [
    ({"beta": 0}, "training.preference.beta"),
    ({"rounds": 0}, "training.preference.rounds"),
    ({"unknown": 1}, "training.preference.unknown"),
])
def test_bad_preference_settings_fail_step_one(tmp_path, tiny_model_dir, capsys, setting, expected):
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": {**PREFERENCE, **setting}})
    assert main(["train", "--config", str(config)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_a_near_miss_line_naming_no_mining_line_fails_step_one_by_file_and_line(tmp_path, tiny_model_dir, capsys):
    near_miss = tmp_path / "near_miss.jsonl"
    line = json.loads((ROOT / "data/kwanzaa_train.jsonl").read_text().splitlines()[2])  # a refusal
    line["meta"] = {**line["meta"], "id": "x.near_miss", "near_miss_of": "no-such-line"}
    near_miss.write_text(json.dumps(line) + "\n")
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": {
        **PREFERENCE, "near_miss_file": str(near_miss)}})
    assert main(["train", "--config", str(config)]) == 2
    assert f"{near_miss}:1: meta.near_miss_of 'no-such-line'" in capsys.readouterr().err


def test_a_near_miss_line_from_the_eval_split_fails_step_one(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir)
    train_line = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    eval_line = json.loads((tmp_path / "eval.jsonl").read_text().splitlines()[0])
    meta = {k: v for k, v in eval_line["meta"].items() if k not in ("gold_documents", "key_facts")}  # a refusal's
    eval_line["meta"] = {**meta, "expect_refusal": True, "near_miss_of": train_line["meta"]["id"]}
    near_miss = tmp_path / "near_miss.jsonl"
    near_miss.write_text(json.dumps(eval_line) + "\n")
    assert main(["train", "--config", str(config), "--set", "training.preference.enabled=true",
                 "--set", f"training.preference.near_miss_file={near_miss}"]) == 2
    assert f"{near_miss}:1: this prompt is in the eval split" in capsys.readouterr().err


def test_near_miss_pairs_take_the_original_answer_as_rejected(tmp_path, tiny_model_dir):
    config_path = write_run_config(tmp_path, tiny_model_dir)
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    original = next(line for line in lines if not line["meta"]["expect_refusal"])
    refusal = next(line for line in lines if line["meta"]["expect_refusal"])
    near = {"messages": [*original["messages"][:-1], refusal["messages"][-1]],
            "meta": {**original["meta"], "id": "n1", "expect_refusal": True, "near_miss_of": original["meta"]["id"]}}
    path = tmp_path / "near_miss.jsonl"
    path.write_text(json.dumps(near) + "\n")
    config = load_training_config(config_path, (f"training.preference.near_miss_file={path}",
                                                "training.preference.enabled=true"))
    _, pairs = check_preference_data(config)
    assert [(p.id, p.kind) for p in pairs] == [("n1", "near_miss")]
    assert pairs[0].chosen == refusal["messages"][-1]["content"]
    assert pairs[0].rejected == original["messages"][-1]["content"]


class KeepModel(TrainerCallback):
    model = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


@pytest.fixture(scope="module")
def supervised_and_preferred(tmp_path_factory, tiny_model_dir):
    """The same tiny run without and with the preference stage (the tiny model gets every answer wrong)."""
    plain = train_adapter(write_run_config(tmp_path_factory.mktemp("sft"), tiny_model_dir))
    keep = KeepModel()
    directory = tmp_path_factory.mktemp("dpo")
    config = write_run_config(directory, tiny_model_dir, training={"preference": PREFERENCE},
                              evaluation={"behavioral": True})  # generation after TRL has patched the model
    return plain, train_adapter(config, callbacks=(keep,)), keep.model, config


def test_preference_stage_trains_the_adapter_and_leaves_the_base_untouched(supervised_and_preferred, tiny_model_dir):
    plain, preferred, model, config_path = supervised_and_preferred
    assert verify_artifact(preferred.artifact_dir).ok
    weights = "adapter_model.safetensors"
    assert (preferred.artifact_dir / weights).read_bytes() != (plain.artifact_dir / weights).read_bytes()
    baseline = json.loads((preferred.run_dir / "baseline_checksums.json").read_text())
    assert compute_model_state_checksum(model)["model_digest"] == baseline["model_digest"]
    fresh, _, _ = load_base_model(load_training_config(config_path), "cpu", "float32")
    assert compute_model_state_checksum(fresh)["model_digest"] == baseline["model_digest"]
    assert list(model.peft_config) == ["default"]  # TRL's frozen reference copy is gone
    behavioral = json.loads((preferred.artifact_dir / "metadata.json").read_text())["final_metrics"]["behavioral"]
    assert behavioral["adapter"]["json_validity_rate"] is not None


def test_preference_stage_is_recorded_in_metadata_card_and_run_directory(supervised_and_preferred):
    _, preferred, _, _ = supervised_and_preferred
    stage = json.loads((preferred.artifact_dir / "metadata.json").read_text())["preference"]
    [only] = stage["rounds"]
    assert only["examples"] == 8 and only["pairs"] == 8 and sum(only["errors"].values()) == 8
    assert only["steps"] == 4 and stage["beta"] == 0.1 and only["reward_accuracy"] is not None
    card = (preferred.artifact_dir / "README.md").read_text()
    assert "| preference stage | DPO, beta 0.1" in card and "8 pairs" in card
    directory = preferred.run_dir / "preference-1"
    assert len((directory / "pairs.jsonl").read_text().splitlines()) == 8
    assert {p.name for p in directory.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-4"}
    history = [json.loads(line) for line in (directory / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history if h.get("loss") is not None] == [1, 2, 3, 4]


def completion_log_prob(model, tokenizer, prompt: list[dict], answer: str) -> float:
    """log p(answer | prompt), the answer as one assistant turn after the prompt's turns (as TRL tokenizes a
    conversational pair: the chat template with a generation prompt, then the rest of the full template)."""
    prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=True,
                                        return_dict=False)
    assert ids[:len(prefix)] == prefix
    ids = torch.tensor([ids])
    with torch.no_grad():
        log_probs = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    return log_probs.gather(-1, ids[0, 1:, None])[len(prefix) - 1:].sum().item()


def test_preference_stage_raises_the_margin_of_chosen_over_rejected_on_the_pairs_it_wrote(supervised_and_preferred):
    """Read from the pairs file and the two adapters, not from the trainer's logged rewards."""
    from peft import PeftModel

    _, preferred, _, config_path = supervised_and_preferred
    pairs = [json.loads(line) for line in (preferred.run_dir / "preference-1" / PAIRS_FILE).read_text().splitlines()]
    base, tokenizer, _ = load_base_model(load_training_config(config_path), "cpu", "float32")
    # The supervised stage's last checkpoint (step 4 of 4) is the adapter the preference stage started from.
    model = PeftModel.from_pretrained(base, str(preferred.run_dir / "checkpoint-4"), adapter_name="supervised")
    model.load_adapter(str(preferred.artifact_dir), adapter_name="preferred")
    model.eval()
    margins = {}
    for adapter in ("supervised", "preferred"):
        model.set_adapter(adapter)
        margins[adapter] = [completion_log_prob(model, tokenizer, pair["prompt"], pair["chosen"])
                            - completion_log_prob(model, tokenizer, pair["prompt"], pair["rejected"]) for pair in pairs]
    growth = [after - before for before, after in zip(margins["supervised"], margins["preferred"], strict=True)]
    assert len(pairs) == 8
    # Measured: 5.2 to 6.8 nats up on every pair; with chosen and rejected swapped, 9.5 to 11.4 down.
    assert min(growth) > 2.0, growth


class CrashInPreferenceStage(TrainerCallback):
    """Stops the process abruptly after the preference stage's checkpoint at `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if Path(args.output_dir).name.startswith("preference-") and state.global_step >= self.step:
            raise KeyboardInterrupt(f"simulated crash after preference step {state.global_step}")


def test_resume_after_a_crash_in_the_preference_stage_gives_the_same_adapter(supervised_and_preferred, tmp_path,
                                                                            tiny_model_dir):
    _, uninterrupted, _, _ = supervised_and_preferred
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": PREFERENCE})
    with pytest.raises(KeyboardInterrupt):
        train_adapter(config, callbacks=(CrashInPreferenceStage(2),))
    run_dir = tmp_path / "outputs" / "tiny"
    assert (run_dir / "preference-1" / "checkpoint-2").is_dir() and not (run_dir / "final_artifact").exists()
    held = checkpoint_state(run_dir / "preference-1" / "checkpoint-2")  # read before the resume can rotate it
    assert held["step"] == 2 and held["max_steps"] == 4 and held["optimizer"]["steps"] == [2.0]
    result = train_adapter(config, resume=True)
    weights = "adapter_model.safetensors"
    assert (result.artifact_dir / weights).read_bytes() == (uninterrupted.artifact_dir / weights).read_bytes()
    # Equal bytes would also come from a stage that trained again from step 0 (training is deterministic):
    # what the DPO trainer loaded is compared with what the checkpoint holds (as the supervised stage's is).
    [only] = json.loads((result.artifact_dir / "metadata.json").read_text())["preference"]["rounds"]
    assert only["resumed_from"] == "checkpoint-2" and only["steps"] == 4
    assert only["resume"]["started_at_step"] == 2 and only["resume"]["steps_run"] == 2
    assert resume_problems(held, only["resume"]) == []  # its step, optimizer moments and RNG state


def test_no_mined_pairs_publishes_the_supervised_adapter_and_says_so(supervised_and_preferred, tmp_path,
                                                                    tiny_model_dir, monkeypatch, caplog):
    plain, _, _, _ = supervised_and_preferred
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": PREFERENCE})
    lines = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    gold = {json.dumps(line["messages"][:-1]): line["messages"][-1]["content"] for line in lines}
    monkeypatch.setattr("kwanzaa_adapter.training.preference.generate", scripted(gold))
    result = train_adapter(config)
    weights = "adapter_model.safetensors"
    assert (result.artifact_dir / weights).read_bytes() == (plain.artifact_dir / weights).read_bytes()
    [only] = json.loads((result.artifact_dir / "metadata.json").read_text())["preference"]["rounds"]
    assert only["pairs"] == 0 and only["steps"] == 0
    assert "no pairs mined" in caplog.text
    assert "round 1: 0 pairs (no errors of 8 mined" in (result.artifact_dir / "README.md").read_text()


def test_dry_run_names_the_preference_stage(tmp_path, tiny_model_dir, capsys):
    config = write_run_config(tmp_path, tiny_model_dir, training={"preference": PREFERENCE})
    assert main(["train", "--config", str(config), "--dry-run"]) == 0
    assert "preference      DPO, beta 0.1, 1 round(s) mining 8 training examples" in capsys.readouterr().out
    assert not (tmp_path / "outputs").exists()


def _lines(path: str) -> list[str]:
    return (ROOT / path).read_text(encoding="utf-8").splitlines()  # the run files' paths are the repository's


def test_quality_config_trains_both_stages_through_the_cli_in_bf16_on_a_tiny_model(tmp_path, tiny_model_dir):
    """configs/quality.yaml (on demo.yaml) as it is, but for what a tiny run must change: the model and the blocks it
    has, one line of each data file it names, a warmup that does not zero the only step of each stage, short
    generations, no gate (it cross-fits on hundreds of examples), and bf16 whatever this CPU would choose."""
    quality = ROOT / "configs/quality.yaml"
    shipped = load_training_config(quality)
    near_miss = _lines(shipped.training.preference.near_miss_file)[:1]
    original = json.loads(near_miss[0])["meta"]["near_miss_of"]
    train = [line for line in _lines(shipped.data.train_file) if json.loads(line)["meta"]["id"] == original]
    settings = {"model.name_or_path": tiny_model_dir, "model.architecture": "null", "adapter.top_layers": 1,
                "model.precision": "bfloat16", "training.warmup_ratio": 0, "evaluation.max_new_tokens": 8,
                "gate.fit": "false"}
    for key, lines in (("data.train_file", train), ("data.eval_file", _lines(shipped.data.eval_file)[:1]),
                       ("training.preference.near_miss_file", near_miss)):
        settings[key] = tmp_path / f"{key.rsplit('.', 1)[-1]}.jsonl"
        settings[key].write_text("\n".join(lines) + "\n")
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    assert main(["train", "--config", str(quality), "--output-dir", str(tmp_path / "outputs"), *sets]) == 0
    run_dir = tmp_path / "outputs" / shipped.run.name
    artifact = run_dir / "final_artifact"
    assert verify_artifact(artifact).ok
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["precision"]["resolved"] == "bfloat16"
    expected = shipped.training.preference
    stage = metadata["preference"]
    assert (stage["beta"], stage["learning_rate"], stage["num_epochs"], stage["mining_examples"]) == (
        expected.beta, expected.learning_rate, expected.num_epochs, expected.mining_examples)
    [only] = stage["rounds"]
    assert only["examples"] == 1 and only["near_miss"] == 1 and only["pairs"] == 2  # the tiny model errs on its line
    assert only["steps"] == 1 and only["train_tokens"] > 0  # two pairs at quality.yaml's accumulation: one step
    # The stage moved the weights the supervised stage ended with (its only checkpoint), in bf16, to finite values.
    supervised = load_file(run_dir / "checkpoint-1" / "adapter_model.safetensors")
    published = load_file(artifact / "adapter_model.safetensors")
    assert set(published) == set(supervised) and all(published[name].isfinite().all() for name in published)
    assert [name for name in published if published[name].equal(supervised[name])] == []
