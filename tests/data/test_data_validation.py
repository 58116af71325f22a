"""Every malformed line is reported with its kind and line number; good files give statistics."""

from __future__ import annotations

import json

import pytest

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT
from kwanzaa_adapter.data import validation
from kwanzaa_adapter.data.chat_template import tokenize_conversation
from kwanzaa_adapter.data.validation import DataError, format_report, load_examples, validate_file

EMPTY_UNKNOWNS = {"unsupported_claims": [], "missing_context": [], "clarifying_questions": []}


def gold(refusal: bool = False, **body) -> dict:
    text = "The documents do not say." if refusal else "Kwanzaa begins on December 26 [1]."
    return {
        "version": "kwanzaa.answer.v1",
        "answer": {"text": text, "confidence": 0.9,
                   "completeness": "insufficient_data" if refusal else "complete", **body},
        "sources": [] if refusal else [{"citation": 1, "title": "Kwanzaa"}],
        "unknowns": EMPTY_UNKNOWNS,
    }


def rag(id: str = "r1", refusal: bool = False, **changes) -> dict:
    record = {
        "id": id,
        "question": "When does Kwanzaa begin?",
        "documents": [{"title": "Kwanzaa", "year": 1966, "text": "Kwanzaa begins on December 26."}],
        "expect_refusal": refusal,
        "answer": gold(refusal),
    }
    return {**record, **changes}


def chat(*turns: tuple[str, str], meta: dict | None = None) -> dict:
    line = {"messages": [{"role": r, "content": c} for r, c in turns or (("user", "hi"), ("assistant", "hello"))]}
    return line if meta is None else {**line, "meta": meta}


def write(tmp_path, *lines) -> str:
    path = tmp_path / "data.jsonl"
    raw = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def only_issue(path, **kwargs):
    result = validate_file(path, **kwargs)
    assert len(result.issues) == 1, format_report(result)
    return result.issues[0]


MALFORMED = {
    "invalid_utf8": (b'{"messages": "caf\xe9"}', "invalid UTF-8 at byte 17"),
    "bom": (b"\xef\xbb\xbf" + json.dumps(chat()).encode(), "byte-order mark"),
    "blank_line": (b"   ", "blank line"),
    "invalid_json": (b'{"messages": [}', "at column 15"),
    "not_object": (b"[1, 2]", "line is a JSON list, not an object"),
    "unknown_form": (json.dumps({"prompt": "x"}).encode(), "keys: prompt"),
    "unknown_role": (chat(("user", "q"), ("tool", "x"), ("assistant", "a")),
                     "messages[1].role: must be one of system, user, assistant (got 'tool')"),
    "missing_role": ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
                     "messages[0].role: missing"),
    "no_assistant_turn": (chat(("system", "s"), ("user", "q")), "messages: no assistant turn"),
    "empty_content": (chat(("user", "  "), ("assistant", "a")), "messages[0].content: content is empty"),
    "too_deep": (b"[" * 100 + b"]" * 100, "deeper than 64 levels"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_line_is_reported_with_kind_and_line_number(tmp_path, kind):
    bad, message = MALFORMED[kind]
    path = write(tmp_path, rag("a"), bad, chat())
    issue = only_issue(path)
    assert (issue.path, issue.line, issue.kind) == (path, 2, kind)
    assert message in issue.message


@pytest.mark.parametrize(
    "record, message",
    [
        (rag(answer=gold(confidence=2.0)), "answer.answer.confidence: must be <= 1.0"),
        (rag(answer=gold(completeness="done")),
         "answer.answer.completeness: must be one of complete, partial, insufficient_data (got 'done')"),
        (rag(expect_refusal=True), "answer: answer is not a refusal but expect_refusal is True"),
        (rag(answer={**gold(), "sources": []}), "answer: sources list [] but answer.text cites [1]"),
    ],
)
def test_rag_gold_answer_breaking_the_contract_is_reported(tmp_path, record, message):
    issue = only_issue(write(tmp_path, record))
    assert (issue.line, issue.kind, issue.message) == (1, "answer_contract", message)


def test_chat_contract_task_answer_must_parse(tmp_path):
    prose = chat(("user", "q"), ("assistant", "Kwanzaa starts in December."), meta={"expect_refusal": False})
    issue = only_issue(write(tmp_path, prose))
    assert issue.kind == "answer_contract"
    assert issue.message.startswith("messages[1].content: not a kwanzaa.answer.v1 answer: output does not start")


def test_chat_contract_refusal_must_agree_with_meta(tmp_path):
    line = chat(("user", "q"), ("assistant", json.dumps(gold())), meta={"expect_refusal": True})
    issue = only_issue(write(tmp_path, line))
    assert issue.message == "messages[1].content: answer is not a refusal but meta.expect_refusal is true"


def test_chat_without_contract_task_may_hold_prose(tmp_path):
    assert validate_file(write(tmp_path, chat(meta={"source": "smalltalk"}))).ok


def test_schema_errors_name_the_key_without_a_pydantic_dump(tmp_path):
    record = rag(documents=[{"title": "T"}], extra=1)
    result = validate_file(write(tmp_path, record))
    messages = sorted(issue.message for issue in result.issues)
    assert messages == ["documents[0].text: missing", "extra: unknown key"]
    assert result.counts == {"schema": 2}


@pytest.mark.parametrize(
    "lines, kind, message",
    [
        ((rag("x"), rag("x")), "duplicate_id", "id: 'x' already used on line 1"),
        ((chat(meta={"id": "c"}), chat(meta={"id": "c"})), "duplicate_id", "meta.id: 'c' already used on line 1"),
        ((chat(), b'{"messages": [], "a": NaN}'), "invalid_json", "NaN is not valid JSON"),
        ((chat(), b'{"messages": 1, "messages": 2}'), "invalid_json", "duplicate key(s) ['messages']"),
        ((chat(), b'{"n": ' + b"9" * 5000 + b"}"), "invalid_json", "integer string conversion"),
        ((chat(), rag(answer=None)), "no_assistant_turn", "answer: missing"),
    ],
)
def test_line_level_problems_on_line_two(tmp_path, lines, kind, message):
    issue = only_issue(write(tmp_path, *lines), require_answer=True)
    assert (issue.line, issue.kind) == (2, kind) and message in issue.message


def test_rag_record_without_answer_is_valid_for_evaluation(tmp_path):
    assert validate_file(write(tmp_path, rag(answer=None))).ok


def test_hostile_nesting_does_not_recurse(tmp_path):
    issue = only_issue(write(tmp_path, b"[" * 200_000 + b"]" * 200_000))
    assert issue.kind == "too_deep"


def test_overlong_line_is_rejected_unparsed_and_later_lines_keep_their_numbers(tmp_path):
    huge = b'{"messages": "' + b"x" * (validation.MAX_LINE_BYTES + 10) + b'"}'
    result = validate_file(write(tmp_path, chat(), huge, b"[]"))
    assert [(i.line, i.kind) for i in result.issues] == [(2, "line_too_long"), (3, "not_object")]


def test_issue_list_is_bounded_and_the_rest_counted(tmp_path):
    result = validate_file(write(tmp_path, *[b"[]"] * 150), max_issues=100)
    assert len(result.issues) == 100 and result.omitted == 50
    assert result.counts == {"not_object": 150}
    assert format_report(result).splitlines()[-2:] == [
        "... 50 more issue(s) not listed", f"{result.path}: 150 issue(s): not_object 150"]


def test_empty_file_is_an_issue(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    assert validate_file(path).counts == {"empty_file": 1}


def test_record_over_max_seq_length_is_reported(tmp_path, tokenizer):
    issue = only_issue(write(tmp_path, rag()), tokenizer=tokenizer, max_seq_length=20)
    assert issue.kind == "too_long" and "over max_seq_length 20" in issue.message


def test_report_lists_file_line_kind_message_and_counts(tmp_path):
    path = write(tmp_path, b"[]", chat(("user", "q")))
    assert format_report(validate_file(path)).splitlines() == [
        f"{path}:1: not_object: line is a JSON list, not an object",
        f"{path}:2: no_assistant_turn: messages: no assistant turn",
        f"{path}: 2 issue(s): no_assistant_turn 1, not_object 1",
    ]


def test_statistics_on_success(tmp_path, tokenizer):
    lines = [rag("a"), rag("b", refusal=True), rag("c"), chat(meta={"id": "d"})]
    result = validate_file(write(tmp_path, *lines), tokenizer=tokenizer, max_seq_length=4096)
    stats = result.statistics
    assert result.ok and stats.rows == 4 and stats.forms == {"chat": 1, "rag": 3}
    assert (stats.labelled_rows, stats.refusals, stats.refusal_share) == (3, 1, pytest.approx(1 / 3))
    expected = [tokenize_conversation(c.messages, tokenizer, None) for c in load_examples(result.path)]
    lengths = sorted(len(e.input_ids) for e in expected)
    assert stats.supervised_tokens == sum(e.supervised_tokens for e in expected)
    assert (stats.token_lengths.p50, stats.token_lengths.max) == (lengths[1], lengths[-1])
    report = format_report(result)
    assert "refusal share" in report and "33.3% of 3" in report and "supervised tokens" in report


def test_load_examples_renders_rag_records_with_the_system_prompt(tmp_path):
    conversations = load_examples(write(tmp_path, rag("a"), chat()), "Be brief.")
    first = conversations[0]
    assert [m["role"] for m in first.messages] == ["system", "user", "assistant"]
    assert first.messages[0]["content"] == "Be brief."
    assert first.messages[1]["content"].startswith("Documents:\n[1] Kwanzaa (1966)\n")
    assert (first.id, first.expect_refusal, first.line, conversations[1].line) == ("a", False, 1, 2)


def test_load_examples_raises_data_error_with_every_issue(tmp_path):
    with pytest.raises(DataError) as caught:
        load_examples(write(tmp_path, b"[]", rag(answer=None)), DEFAULT_SYSTEM_PROMPT)
    assert [(i.line, i.kind) for i in caught.value.issues] == [(1, "not_object"), (2, "no_assistant_turn")]
    assert "2 data problem(s)" in str(caught.value)
