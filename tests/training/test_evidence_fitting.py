"""The evidence selector fitted in the workflow on training records only, sealed in the artifact, applied where
the adapter answers; and the behavioral table's baselines beside the adapter."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.generation.evidence import EVIDENCE_FILE, candidates, load_evidence_selector
from kwanzaa_adapter.safety.artifacts import verify_artifact
from kwanzaa_adapter.training.evidence_fitting import gold_sentences

OPENING = '{"version":"kwanzaa.answer.v1","answer":{"text":"'


def test_the_gold_sentence_is_the_cited_documents_sentence_closest_to_the_answer():
    items = load_eval_items(ROOT / "data" / "kwanzaa_train_records.jsonl")
    checked = 0
    for item in items[:40]:
        gold = gold_sentences(item)
        if item.example.expect_refusal:
            assert gold == set()
            continue
        found = {(c.document, c.index): c.sentence for c in candidates(item.example.documents)}
        assert gold and gold <= set(found), item.id
        assert {number for number, _ in gold} <= set(item.example.gold), item.id  # in a cited document
        checked += 1
    assert checked > 20
    origin = next(item for item in items if item.id == "kwanzaa_origin.q1")
    (place,) = gold_sentences(origin)
    sentences = {(c.document, c.index): c.sentence for c in candidates(origin.example.documents)}
    assert sentences[place].startswith("Kwanzaa was created by Maulana Karenga")


@pytest.fixture
def evidence_run(gated_run):
    return gated_run


def test_the_workflow_fits_the_selector_in_the_gates_pass_and_seals_it(evidence_run):
    _, decisions, result = evidence_run
    artifact = result.artifact_dir
    selector = load_evidence_selector(artifact)
    assert selector is not None and selector.depth == 2 and selector.weight.shape == (2 * 4,)  # 2 blocks x 4 heads
    answerable = sum(not json.loads(line)["expect_refusal"] for line in decisions.read_text().splitlines())
    assert selector.info["examples"] == answerable and 0 <= selector.info["calibration_top1"] <= 1
    assert result.gate is not None  # the same pass fitted the gate
    assert EVIDENCE_FILE in json.loads((artifact / "checksums.json").read_text())["files"]
    metadata = json.loads((artifact / "metadata.json").read_text())
    assert metadata["evidence"]["file"] == EVIDENCE_FILE and metadata["evidence"]["blocks"] == 2


def test_the_table_holds_both_baselines_the_adapter_and_the_finished_answers(evidence_run):
    _, _, result = evidence_run
    report = result.behavior
    assert [run.label for run in report.runs] == ["base", "lexical", "adapter", "adapter+gate",
                                                  "adapter+gate+evidence"]
    assert set(report.as_json()) >= {"base", "lexical", "adapter", "adapter_gate", "adapter_gate_evidence",
                                     "baselines"}
    for run in report.runs:  # every run scored on the eval records' answer keys
        assert {"answer_correctness_rate", "gold_citation_precision", "exact_answer_rate"} <= set(run.rates)
    # The base model answers under the contract's grammar: it writes an answer to the token limit, where the
    # unconstrained decoding of a model that does not open with '{' stops it at its first token.
    assert all(row["output"].startswith(OPENING) and len(row["output"]) > len(OPENING) for row in report.base.rows)
    lexical = report.lexical.rows
    assert all(parse_answer(row["output"]).ok for row in lexical)
    assert report.baselines["lexical"]["train_examples"] == 16


def test_a_zeroed_or_swapped_selector_fails_verification_and_the_backend_reads_the_verified_one(
        evidence_run, tmp_path):
    import shutil

    config, _, result = evidence_run
    served = model_from_config(load_training_config(config), adapter=result.artifact_dir)
    assert served.selector is not None and served.describe()["evidence"]["apply"] == "hold"
    for change in ("zeroed", "swapped"):
        copy = tmp_path / change
        shutil.copytree(result.artifact_dir, copy)
        target = copy / EVIDENCE_FILE
        if change == "zeroed":
            target.write_bytes(b"\0" * target.stat().st_size)
        else:  # another selector of the same shape, as a second run would have fitted it
            other = load_evidence_selector(copy)
            type(other)(other.depth, other.second, other.weight.flip(0), other.bias, other.mean, other.scale,
                        other.info).save(target)
        report = verify_artifact(copy)
        assert not report.ok and EVIDENCE_FILE in report.format(), change
