"""Hostile datasets: lines that are not JSON objects, records that break the schema, and files that are
not plain text (a FIFO, a directory, 100,000 rows with a bad last one).

Every case is refused by `validate-data`, or by `train` for a bad line in its train file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from .corpus_base import TRAIN_RECORDS, Case, _set, _train, _valid_config


def _data_cases() -> dict[str, Case]:
    good = TRAIN_RECORDS.read_text(encoding="utf-8").splitlines()[0]
    record = json.loads(good)

    def lines(*rows: str | bytes):
        def make(case_dir: Path) -> tuple[str, ...]:
            path = case_dir / "data.jsonl"
            path.write_bytes(b"".join((r if isinstance(r, bytes) else r.encode("utf-8")) + b"\n" for r in rows))
            return ("validate-data", str(path))

        return make

    def edited(**changes) -> str:
        value = json.loads(good)
        for key, new in changes.items():
            if new is None:
                value.pop(key, None)
            else:
                value[key] = new
        return json.dumps(value)

    def many_rows(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        head, tail = good.split(json.dumps(record["id"]), 1)
        with path.open("w", encoding="utf-8") as handle:
            for number in range(100_000):
                handle.write(f'{head}"row-{number}"{tail}\n')
            handle.write('{"id": "last", "question": "?"}\n')
        return ("validate-data", str(path))

    def fifo(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        os.mkfifo(path)
        return ("validate-data", str(path))

    def directory(case_dir: Path) -> tuple[str, ...]:
        (case_dir / "data.jsonl").mkdir()
        return ("validate-data", str(case_dir / "data.jsonl"))

    def missing(case_dir: Path) -> tuple[str, ...]:
        return ("validate-data", str(case_dir / "absent.jsonl"))

    def through_train(case_dir: Path) -> tuple[str, ...]:
        path = case_dir / "data.jsonl"
        path.write_text(good + "\n{not json\n", encoding="utf-8")
        config = _set(_valid_config(), "data.train_file", str(path))
        (case_dir / "run.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        return _train(case_dir, case_dir / "run.yaml")

    bad_answer = dict(record["answer"], version="kwanzaa.answer.v0")
    wrong_citation = json.loads(json.dumps(record["answer"]))
    wrong_citation["answer"]["text"] += " [7]."
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    return {
        "data_not_json": ("data.jsonl:1: invalid_json", lines("{this is not json")),
        "data_json_array": ("line is a JSON list, not an object", lines("[1, 2, 3]")),
        "data_json_string": ("line is a JSON str, not an object", lines('"a string"')),
        "data_empty_file": ("the file holds no records", lines()),
        "data_blank_lines_only": ("data.jsonl:2: blank_line", lines("", "   ")),
        "data_missing_question": ("schema: question: missing", lines(edited(question=None))),
        "data_empty_question": ("question: question is empty", lines(edited(question="   "))),
        "data_documents_not_list": ("documents: must be a list", lines(edited(documents="doc"))),
        "data_expect_refusal_string": (
            "expect_refusal: must be true or false", lines(edited(expect_refusal="maybe"))),
        "data_unknown_field": ("extra_field: unknown key", lines(edited(extra_field=1))),
        "data_answer_wrong_version": ("answer.version: must be kwanzaa.answer.v1", lines(edited(answer=bad_answer))),
        "data_citation_out_of_range": (
            "cites document(s) [7] but only 3 are provided", lines(edited(answer=wrong_citation))),
        "data_chat_unknown_role": (
            "messages[0].role: must be one of system, user, assistant",
            lines(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}))),
        "data_chat_no_assistant": (
            "messages: no assistant turn", lines(json.dumps({"messages": chat["messages"][:1]}))),
        "data_chat_empty_content": (
            "messages[1].content: content is empty",
            lines(json.dumps({"messages": [chat["messages"][0], {"role": "assistant", "content": ""}]}))),
        "data_duplicate_ids": ("already used on line 1", lines(good, good)),
        "data_huge_line": ("over the 1048576-byte limit", lines(edited(question="why " * 3_000_000))),
        "data_deep_nesting": (
            "JSON nests deeper than 64 levels", lines('{"id": ' + "[" * 100_000 + "]" * 100_000 + "}")),
        "data_nul_bytes": (
            "invalid_json: Invalid control character",
            lines(good.replace('"question": "', '"question": "\u0000', 1).encode("utf-8")
                  .replace(b"\\u0000", b"\x00"))),
        "data_not_utf8": ("invalid UTF-8 at byte 9", lines(b'{"id": "x\xff\xfe", "question": "q"}')),
        "data_100k_rows_bad_last": ("data.jsonl:100001: schema", many_rows),
        "data_fifo": ("is not a regular file", fifo),
        "data_is_directory": ("is not a regular file", directory),
        "data_file_missing": ("file not found", missing),
        "data_bad_line_through_train": ("data.jsonl:2: invalid_json", through_train),
    }

