"""The third eval set (paraphrased questions over documents nothing trains on) and the answer keys of every eval set."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, load_script
from kwanzaa_adapter.data.facts import states
from kwanzaa_adapter.data.records import RagRecord
from kwanzaa_adapter.evaluation.eval_set import load_eval_items

DATA_DIR = ROOT / "data"
build_dataset = load_script(DATA_DIR / "build_dataset.py", "build_dataset")


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA_DIR / name).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    return build_dataset.build_outputs()


def test_the_third_set_asks_with_few_of_its_documents_words_and_refuses_on_the_very_subject():
    records = [RagRecord.model_validate(row) for row in read("kwanzaa_paraphrase_records.jsonl")]
    refusals = [r for r in records if r.expect_refusal]
    assert len(records) >= 60 and len(refusals) >= 0.4 * len(records)
    documents, questions = build_dataset.load_sources()
    shares = build_dataset.check_paraphrase(questions, documents)
    assert len(shares) == len(records) - len(refusals) and max(shares.values()) <= 0.4
    by_id = {q.id: q for q in questions}
    for record in refusals:  # a refusal shows the document about the subject it asks of
        question = by_id[record.id]
        assert question.refusal == "nearby_detail" and question.doc_ids
        assert {documents[d].title for d in question.doc_ids} <= {d.title for d in record.documents}


def test_every_answerable_eval_record_carries_key_facts_its_gold_documents_state():
    for split in ("eval", "heldout", "paraphrase"):
        items = load_eval_items(DATA_DIR / f"kwanzaa_{split}.jsonl")  # the chat form, as the demo reads it
        answerable = [item for item in items if not item.example.expect_refusal]
        assert answerable and all(item.example.graded for item in answerable), split
        for item in answerable:
            gold_text = " ".join(item.example.documents[n - 1].text for n in item.example.gold)
            assert all(states(gold_text, fact) for fact in item.example.key_facts), item.id
        assert not any(item.example.key_facts for item in items if item.example.expect_refusal)


def test_a_question_sharing_too_many_of_its_documents_words_fails_the_build(tmp_path):
    source = tmp_path / "source"
    import shutil

    shutil.copytree(DATA_DIR / "source", source)
    path = source / "paraphrase_questions.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    answerable = next(row for row in rows if row["completeness"] != "insufficient_data")
    answerable["question"] = "What does this say: " + answerable["answer_text"].split("{")[0]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    documents, questions = build_dataset.load_sources(source)
    with pytest.raises(ValueError, match=f"{answerable['id']} \\("):
        build_dataset.check_paraphrase(questions, documents)


def _with_train_line(outputs: dict[str, str], line: dict) -> dict[str, str]:
    changed = dict(outputs)
    changed["kwanzaa_train_records.jsonl"] += json.dumps(line) + "\n"
    return changed


@pytest.mark.parametrize("shared", ["document", "question"])
def test_an_eval_only_set_sharing_a_document_or_question_with_training_data_fails_the_build(outputs, shared):
    build_dataset.check_eval_only(outputs)  # the shipped files share nothing
    paraphrase = json.loads(outputs["kwanzaa_paraphrase_records.jsonl"].splitlines()[0])
    train = json.loads(outputs["kwanzaa_train_records.jsonl"].splitlines()[0])
    leak = {**train, "id": "leak"}
    if shared == "document":
        leak["documents"] = leak["documents"] + [paraphrase["documents"][0]]
    else:
        leak["question"] = paraphrase["question"]
    with pytest.raises(ValueError, match=f"kwanzaa_paraphrase_records.jsonl: record '{paraphrase['id']}' shares {shared}"):
        build_dataset.check_eval_only(_with_train_line(outputs, leak))


def test_the_gate_leaves_out_any_decision_example_whose_prompt_is_in_the_third_set(tmp_path):
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.training.gate_fitting import load_decision_data

    decisions = tmp_path / "decisions.jsonl"
    paraphrase = read("kwanzaa_paraphrase_records.jsonl")[:3]
    kept = read("kwanzaa_decisions.jsonl")[:20]
    decisions.write_text("".join(json.dumps({k: v for k, v in row.items() if k in ("id", "question", "documents",
                                                                                      "expect_refusal")}) + "\n"
                                 for row in kept + paraphrase), encoding="utf-8")
    config = load_training_config(ROOT / "configs" / "demo.yaml", (f"gate.decision_file={decisions}",))
    data = load_decision_data(config)
    assert len(data.items) == len(kept) and data.skipped == {"in_an_eval_set": 3}
