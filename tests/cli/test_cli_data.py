"""`validate-data` and `schema` through the CLI; batching waste on the shipped training set."""

from __future__ import annotations

import json

from conftest import ROOT
from kwanzaa_adapter.cli import main
from kwanzaa_adapter.data.collation import make_collator, padding_share
from kwanzaa_adapter.data.tokenization import tokenize_file


def test_shipped_datasets_validate_and_print_statistics(capsys):
    files = [str(ROOT / "data" / name) for name in ("kwanzaa_train.jsonl", "kwanzaa_eval.jsonl")]
    assert main(["validate-data", *files]) == 0
    out = capsys.readouterr().out
    assert "277" in out and "84" in out and "refusal" in out.lower()


def test_malformed_lines_exit_2_each_named_by_line(tmp_path, capsys):
    good = (ROOT / "data/kwanzaa_train.jsonl").read_text().splitlines()[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good, "{not json", "", '{"messages": [{"role": "user", "content": "q"}]}']) + "\n")
    assert main(["validate-data", str(bad)]) == 2
    out = capsys.readouterr().out
    for line in ("bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:4"):
        assert line in out
    assert "bad.jsonl:1:" not in out


def test_validate_data_with_a_config_checks_token_lengths(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    data = ROOT / "data/kwanzaa_eval.jsonl"
    assert main(["validate-data", str(data), "--config", "configs/demo.yaml"]) == 0
    capsys.readouterr()
    short = tmp_path / "short.yaml"
    short.write_text((ROOT / "configs/demo.yaml").read_text().replace("max_seq_length: 1024", "max_seq_length: 300")
                     .replace("qlora.yaml", str(ROOT / "configs/qlora.yaml"))
                     .replace("models/smollm2.yaml", str(ROOT / "configs/models/smollm2.yaml")))
    assert main(["validate-data", str(data), "--config", str(short)]) == 2
    assert "kwanzaa_eval.jsonl:1" in capsys.readouterr().out


def test_schema_command_prints_the_contract(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["$id"] == "kwanzaa.answer.v1"
    assert set(schema["required"]) == {"version", "answer", "sources", "unknowns"}


def test_packing_wastes_under_5_percent_of_computed_tokens_on_the_shipped_set(tokenizer, tmp_path):
    examples, report = tokenize_file(ROOT / "data/kwanzaa_train.jsonl", tokenizer, 1024)
    assert report.rows == 277 and report.truncated == 0
    features = [e.as_features() for e in examples]
    for batching in ("packed", "length_grouped"):
        collate = make_collator(batching, tokenizer)
        ordered = sorted(features, key=lambda f: len(f["input_ids"])) if batching == "length_grouped" else features
        batches = [collate(ordered[i:i + 2]) for i in range(0, len(ordered), 2)]
        share = padding_share(batches)
        assert share < 0.05, (batching, share)
        if batching == "packed":
            assert share == 0.0
