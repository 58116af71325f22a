"""Evaluation: item loading, batched greedy generation, base-vs-adapter runs, and the reports."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_model
from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, Answer, parse_answer
from kwanzaa_adapter.data.records import RagRecord, render_record
from kwanzaa_adapter.evaluation.eval_set import EvalItem, EvaluationDataError, load_eval_items
from kwanzaa_adapter.evaluation.metrics import Example
from kwanzaa_adapter.evaluation.runs import (EvalRun, comparison_json, comparison_table, evaluate, evaluate_base,
                                             plot_comparison, write_predictions)
from kwanzaa_adapter.generation.decoding import generate

DOCS = [
    {"title": "Umoja", "source": "Kwanzaa notes", "year": 1966, "text": "Umoja means unity; it is the first principle."},
    {"title": "Kujichagulia", "text": "Kujichagulia means self-determination; it is the second principle."},
]
ANSWER = {
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "Umoja means unity [1].", "confidence": 0.9, "completeness": "complete"},
    "sources": [{"citation": 1, "title": "Umoja"}],
    "unknowns": {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []},
}
RECORD = {"id": "r1", "question": "What does Umoja mean?", "documents": DOCS, "expect_refusal": False, "answer": ANSWER}
REFUSAL_RECORD = {"id": "r2", "question": "Who founded the first bank?", "documents": DOCS, "expect_refusal": True}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer from the documents."},
        {"role": "user", "content": "Documents: ... Question: What does Kujichagulia mean?"},
        {"role": "assistant", "content": "{\"version\": \"kwanzaa.answer.v1\"}"},
    ],
    "meta": {"id": "c1", "expect_refusal": False, "documents": DOCS, "split": "eval"},
}
PROMPT_WORDS = ["Umoja", "What is Kwanzaa and when is it held each year?", "Nia " * 12, "Imani", "Ujima means " * 5]
MAX_NEW = 10


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def prompts_of_different_lengths():
    return [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}] for text in PROMPT_WORDS]


def items_for(prompts):
    example = Example(question="q", documents=[], expect_refusal=False)
    return [EvalItem(f"p{i}", prompt, example) for i, prompt in enumerate(prompts)]


# --------------------------------------------------------------------------- loading


def test_rag_records_render_with_the_shared_renderer_without_the_answer(tmp_path):
    items = load_eval_items(write_jsonl(tmp_path / "eval.jsonl", [RECORD, "", REFUSAL_RECORD]), "SYS")
    assert [item.id for item in items] == ["r1", "r2"]
    record = RagRecord.model_validate(RECORD)
    assert items[0].prompt == render_record(record.model_copy(update={"answer": None}), "SYS")
    assert [m["role"] for m in items[0].prompt] == ["system", "user"]
    assert items[0].reference == Answer.model_validate(ANSWER).to_json()
    assert items[1].reference is None
    assert [item.example.expect_refusal for item in items] == [False, True]
    assert [d.title for d in items[0].example.documents] == ["Umoja", "Kujichagulia"]


def test_chat_lines_prompt_with_the_turns_before_the_last_assistant(tmp_path):
    (item,) = load_eval_items(write_jsonl(tmp_path / "eval.jsonl", [CHAT]), DEFAULT_SYSTEM_PROMPT)
    assert item.id == "c1"
    assert item.prompt == CHAT["messages"][:2]
    assert item.reference == CHAT["messages"][2]["content"]
    assert item.example.expect_refusal is False
    assert len(item.example.documents) == 2


def test_chat_line_without_documents_is_refused_naming_its_line(tmp_path):
    no_docs = {**CHAT, "meta": {"id": "c2", "expect_refusal": False}}
    path = write_jsonl(tmp_path / "eval.jsonl", [RECORD, no_docs])
    with pytest.raises(EvaluationDataError, match=r"eval\.jsonl:2: .*behavioral metrics need the documents"):
        load_eval_items(path)


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", r"eval\.jsonl:2: not a JSON line"),
        ({**RECORD, "expect_refusal": True}, r"eval\.jsonl:2: .*is not a refusal"),
        ({**REFUSAL_RECORD, "documents": [{"title": "x"}]}, r"eval\.jsonl:2: documents\.0\.text: Field required"),
        ({**CHAT, "meta": {**CHAT["meta"], "expect_refusal": "maybe"}}, r"eval\.jsonl:2: meta: expect_refusal"),
    ],
)
def test_invalid_line_is_reported_with_file_and_line(tmp_path, bad_line, expected):
    with pytest.raises(EvaluationDataError, match=expected):
        load_eval_items(write_jsonl(tmp_path / "eval.jsonl", [RECORD, bad_line]))


def test_max_examples_stops_reading_before_later_lines(tmp_path):
    items = load_eval_items(write_jsonl(tmp_path / "eval.jsonl", [RECORD, REFUSAL_RECORD, "{broken"]), max_examples=2)
    assert [item.id for item in items] == ["r1", "r2"]


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_at_a_time_in_prompt_order(tiny_llama, tokenizer):
    prompts = prompts_of_different_lengths()
    batched = generate(tiny_llama, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=3, progress=False)
    singles = [generate(tiny_llama, tokenizer, [p], max_new_tokens=MAX_NEW, batch_size=1, progress=False) for p in prompts]
    assert batched.token_ids == [single.token_ids[0] for single in singles]
    assert batched.outputs == [single.outputs[0] for single in singles]
    assert batched.new_tokens == sum(single.new_tokens for single in singles)
    assert all(0 < len(ids) <= MAX_NEW for ids in batched.token_ids)
    assert tokenizer.padding_side == "right"  # restored after generation


def test_generation_is_deterministic(tiny_llama, tokenizer):
    prompts = prompts_of_different_lengths()[:3]
    first = generate(tiny_llama, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=2, progress=False)
    second = generate(tiny_llama, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=2, progress=False)
    assert first.token_ids == second.token_ids


def test_generation_stops_at_eos_and_counts_it_once(tiny_llama, tokenizer):
    # A head that scores only the eos token makes eos the greedy choice at every step.
    eos_head = torch.nn.Linear(tiny_llama.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        eos_head.weight.zero_()
        eos_head.bias.zero_()
        eos_head.bias[tokenizer.eos_token_id] = 10.0
    tiny_llama.lm_head = eos_head
    prompts = prompts_of_different_lengths()
    result = generate(tiny_llama, tokenizer, prompts, max_new_tokens=MAX_NEW, batch_size=2, progress=False)
    assert result.outputs == [""] * len(prompts)
    assert result.token_ids == [[]] * len(prompts)
    assert result.new_tokens == len(prompts)


def test_generation_restores_training_mode(tiny_llama, tokenizer):
    tiny_llama.train()
    generate(tiny_llama, tokenizer, prompts_of_different_lengths()[:1], max_new_tokens=2, batch_size=1, progress=False)
    assert tiny_llama.training


# --------------------------------------------------------------------------- base vs adapter


@pytest.fixture
def perturbed_peft_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        build_tiny_model("llama", len(tokenizer)),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=2.0)  # lora_B starts at zero, i.e. an adapter that changes nothing
    return model


def test_disabled_adapter_reproduces_the_base_model_and_the_adapter_changes_outputs(
    tiny_llama, tokenizer, perturbed_peft_model
):
    items = items_for(prompts_of_different_lengths())
    reference = generate(tiny_llama, tokenizer, [i.prompt for i in items], max_new_tokens=MAX_NEW, batch_size=5, progress=False)
    settings = dict(max_new_tokens=MAX_NEW, batch_size=5, progress=False)
    base_run = evaluate_base(perturbed_peft_model, tokenizer, items, **settings)
    adapter_run = evaluate(perturbed_peft_model, tokenizer, items, label="adapter", **settings)
    assert [row["output"] for row in base_run.rows] == reference.outputs
    assert [row["output"] for row in adapter_run.rows] != reference.outputs
    assert (base_run.label, adapter_run.label) == ("base", "adapter")
    assert base_run.tokens_per_second > 0


# --------------------------------------------------------------------------- reports


ROW_KEYS = {"id", "model", "output", "parsed", "parse_error", "json_valid", "refused", "refusal_correct",
            "citation_ok", "groundedness", "cited", "gold_cited", "decision", "refuse_probability", "engine",
            "facts_missing", "correct", "cited_gold", "cited_other", "exact"}


def test_evaluate_scores_every_item_and_predictions_have_one_line_per_example_and_model(
    tiny_llama, tokenizer, tmp_path
):
    items = load_eval_items(write_jsonl(tmp_path / "eval.jsonl", [RECORD, REFUSAL_RECORD, CHAT]))
    run = evaluate(tiny_llama, tokenizer, items, max_new_tokens=4, batch_size=2, label="base", progress=False)
    # Random weights never emit a valid answer: every rate follows from invalid outputs.
    assert run.rates == {"json_validity_rate": 0.0, "citation_rate": 0.0,
                         "refusal_correctness_rate": 0.0, "retrieval_groundedness_rate": None,
                         "gold_citation_rate": None, "answer_correctness_rate": None, "gold_citation_precision": None, "exact_answer_rate": None}
    other = EvalRun("adapter", run.rates, [{**row, "model": "adapter"} for row in run.rows], 1.0)
    path = write_predictions(tmp_path / "out" / "eval_predictions.jsonl", [run, other])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6
    assert {(line["id"], line["model"]) for line in lines} == {
        (i, m) for i in ("r1", "r2", "c1") for m in ("base", "adapter")
    }
    assert all(set(line) == ROW_KEYS for line in lines)
    assert all(line["parsed"] is None and line["parse_error"] for line in lines)


BASE = {"json_validity_rate": 0.25, "citation_rate": None, "refusal_correctness_rate": 0.5,
        "retrieval_groundedness_rate": 0.0}
ADAPTER = {"json_validity_rate": 1.0, "citation_rate": 0.75, "refusal_correctness_rate": 0.25,
           "retrieval_groundedness_rate": 0.6}


LEXICAL = {"json_validity_rate": 1.0, "citation_rate": 1.0, "refusal_correctness_rate": 0.75,
           "retrieval_groundedness_rate": 1.0, "answer_correctness_rate": 0.5}


def test_comparison_table_has_a_column_per_run_in_order_and_na():
    table = comparison_table({"base": BASE, "lexical": LEXICAL, "adapter+gate": ADAPTER})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows == {
        "json_validity_rate": ["0.250", "1.000", "1.000"],
        "citation_rate": ["n/a", "1.000", "0.750"],
        "refusal_correctness_rate": ["0.500", "0.750", "0.250"],
        "retrieval_groundedness_rate": ["0.000", "1.000", "0.600"],
        "answer_correctness_rate": ["n/a", "0.500", "n/a"],
    }
    assert table.splitlines()[0].split() == ["metric", "base", "lexical", "adapter+gate"]


def test_comparison_json_keys_by_run_then_metric():
    runs = EvalRun("base", BASE, [], 1.0), EvalRun("lexical", LEXICAL, [], 0.0), EvalRun("adapter+gate", ADAPTER, [], 1.0)
    assert comparison_json(runs) == {"base": BASE, "lexical": LEXICAL, "adapter_gate": ADAPTER}


def test_plot_is_a_png(tmp_path):
    path = plot_comparison({"base": BASE, "lexical": LEXICAL, "adapter": ADAPTER}, tmp_path / "plots" / "comparison.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_generation_stops_once_the_output_cannot_be_a_json_object(tokenizer):
    from kwanzaa_adapter.generation.decoding import NotAJsonObject

    prompt = tokenizer("Question: when?")["input_ids"]
    rows = [prompt + tokenizer(text)["input_ids"][:3] for text in ("Kwanzaa began", ' {"version"', "  ")]
    width = max(len(r) for r in rows)
    batch = torch.tensor([r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows])
    stop = NotAJsonObject(tokenizer, len(prompt))(batch, None)
    assert stop.tolist() == [True, False, False]
    assert not parse_answer("Kwanzaa began").ok  # stopping there changes no verdict
