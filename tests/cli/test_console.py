"""Answers rendered for people in `chat` and `generate`, and `--json` for scripts; `chat` driven through a
pseudo-terminal as a person meets it."""

from __future__ import annotations

import json
import os
import sys

import pexpect

from conftest import ROOT
from kwanzaa_adapter.backend.models.causal_lm import AnswerResult
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.cli.console import Style, render_answer
from kwanzaa_adapter.contract import Answer
from tiny_artifact import tiny_artifact, write_records  # noqa: F401

ANSWER = Answer.model_validate({
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "Kwanzaa runs from December 26 to January 1 [2], and was first held in 1966 [1].",
               "confidence": 0.9, "completeness": "complete"},
    "sources": [{"citation": 2, "title": "The Week of Kwanzaa", "source": "holiday guide", "year": 2001},
                {"citation": 1, "title": "Kwanzaa's Origins", "url": "https://example.org/origins"}],
    "unknowns": {}})
REFUSAL = Answer.model_validate({
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "The documents do not say where he was born.", "confidence": 0.2,
               "completeness": "insufficient_data"},
    "sources": [], "unknowns": {"missing_context": ["his place of birth"]}})
GATE = {"decision": "answer", "refuse_probability": 0.125}


def test_an_answer_reads_as_text_then_its_sources_numbered_then_a_quiet_status_line():
    text = render_answer(AnswerResult(ANSWER.to_json(), ANSWER, None, GATE), seconds=2.04, tokens=51)
    assert text.splitlines() == [
        "Kwanzaa runs from December 26 to January 1 [2], and was first held in 1966 [1].",
        "",
        "Sources",
        "  [1] Kwanzaa's Origins https://example.org/origins",
        "  [2] The Week of Kwanzaa (holiday guide, 2001)",
        "gate: answer (P(refuse) 0.12) · complete, confidence 0.90 · 51 tokens in 2.0 s",
    ]


def test_a_refusal_reads_as_one_with_what_is_missing():
    text = render_answer(AnswerResult(REFUSAL.to_json(), REFUSAL, None, {"decision": "refuse",
                                                                         "refuse_probability": 0.91}))
    assert text.splitlines() == ["Refused: The documents do not say where he was born.",
                                 "  missing: his place of birth",
                                 "gate: refuse (P(refuse) 0.91) · insufficient_data, confidence 0.20"]


def test_an_output_outside_the_contract_is_shown_as_such_with_the_output():
    result = AnswerResult.from_output("Kwanzaa is a holiday")
    lines = render_answer(result).splitlines()
    assert lines[0].startswith("Not a kwanzaa.answer.v1 answer: ") and lines[1] == "Kwanzaa is a holiday"


def test_a_citation_the_sources_do_not_list_is_pointed_out():
    unlisted = Answer.model_validate({**ANSWER.model_dump(mode="json", exclude_none=True),
                                      "sources": [ANSWER.sources[0].model_dump(mode="json", exclude_none=True)]})
    assert "cited but not listed: [1]" in render_answer(AnswerResult(unlisted.to_json(), unlisted, None))


def test_styles_only_on_a_terminal_without_no_color(monkeypatch):
    class Terminal:
        def isatty(self):
            return True

    class File:
        def isatty(self):
            return False

    assert Style.for_stream(Terminal()).enabled and not Style.for_stream(File()).enabled
    monkeypatch.setenv("NO_COLOR", "1")
    assert not Style.for_stream(Terminal()).enabled
    styled = render_answer(AnswerResult(ANSWER.to_json(), ANSWER, None, GATE), Style(True))
    assert "\x1b[2mgate: answer" in styled and "\x1b[1mSources\x1b[0m" in styled


def test_generate_renders_each_record_for_people_and_json_for_scripts(tiny_artifact, tmp_path, capsys):
    config, artifact = tiny_artifact
    records = write_records(tmp_path / "records.jsonl", 2)
    command = ["generate", "--config", str(config), "--adapter", str(artifact), "--input", str(records),
               "--set", "evaluation.max_new_tokens=4"]
    assert main(command) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    for row in rows:  # each record under its id and question, never as a JSON line
        assert f"{row['id']}: {row['question']}\n" in out
    assert '"id":' not in out and out.count("Not a kwanzaa.answer.v1 answer") + out.count("Sources") \
        + out.count("Refused:") == 2  # 4 tokens: too few for a whole answer, each shown as the output it is
    assert main([*command, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == [row["id"] for row in rows]


def test_chat_json_writes_one_line_per_question(tiny_artifact, tmp_path, capsys, monkeypatch):
    import io

    config, artifact = tiny_artifact
    monkeypatch.setattr("sys.stdin", io.StringIO("When is Kwanzaa?\n\nWho made it?\n"))
    assert main(["chat", "--config", str(config), "--adapter", str(artifact), "--max-new-tokens", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["question"] for line in lines] == ["When is Kwanzaa?", "Who made it?"]
    assert all(set(line) == {"question", "answer", "error"} for line in lines)


def test_chat_in_a_terminal_renders_each_answer_with_a_quiet_status_line(tiny_artifact, tmp_path):
    config, artifact = tiny_artifact
    documents = tmp_path / "documents.json"
    documents.write_text(json.dumps([{"title": "Kwanzaa", "text": "Kwanzaa is celebrated from December 26."}]))
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "100"}
    env.pop("NO_COLOR", None)
    child = pexpect.spawn(sys.executable, ["-m", "kwanzaa_adapter", "chat", "--config", str(config), "--adapter",
                                           str(artifact), "--documents", str(documents), "--max-new-tokens", "4"],
                          cwd=str(ROOT), env=env, encoding="utf-8", timeout=120)
    try:
        child.expect("1 document\\(s\\). Ask a question")
        child.expect("question> ")
        child.sendline("When is Kwanzaa?")
        child.expect("question> ")
        reply = child.before
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "generating… " in reply and "\r\x1b[2K" in reply  # the counter ran, then its line was cleared
    assert "\x1b[2m" in reply and " tokens in " in reply  # the status line, dim
    # the tiny random model writes no contract answer: shown as such, in the warning colour, with its output
    assert "\x1b[33mNot a kwanzaa.answer.v1 answer: " in reply
    assert '"answer"' not in reply and "Traceback" not in reply
