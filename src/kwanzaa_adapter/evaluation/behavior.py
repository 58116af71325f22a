"""The adapter beside the baselines a user could pick instead, on an eval set: at the end of training and by `eval`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.evaluation.baselines import LEXICAL, fit_lexical_baseline
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.evaluation.runs import (
    EvalRun,
    comparison_json,
    comparison_table,
    engine_arguments,
    evaluate,
    evaluate_base,
    evaluate_with_and_without_gate,
    finished_run,
    plot_comparison,
    scored_run,
    select_evidence,
    write_predictions,
)
from kwanzaa_adapter.generation.engines import choose_engines
from kwanzaa_adapter.generation.evidence import EvidenceSelector
from kwanzaa_adapter.generation.gate import AnswerabilityGate
from kwanzaa_adapter.generation.grammar import SchemaGrammar

log = logging.getLogger(__name__)
COMPARISON_PLOT = "behavior_comparison.png"


@dataclass
class BehaviorReport:
    base: EvalRun  # the base model answering under the contract's grammar
    adapter: EvalRun | None
    seconds: float = 0.0  # every generation pass and its scoring
    gated: EvalRun | None = None  # the adapter with its answerability gate, beside it without
    gate: dict | None = None  # the gate's description (layer, threshold, calibration AUC)
    engine: dict | None = None  # which engine generated each run, and why the reference if it did
    lexical: EvalRun | None = None  # the word-overlap rules (`baselines`), no model
    baselines: dict | None = None  # how the baselines were made (the lexical threshold and its fit)
    finished: EvalRun | None = None  # the gated (else plain) answers with the evidence and grounding applied
    data: dict | None = None  # the eval file measured: {"file", "records"}

    @property
    def runs(self) -> list[EvalRun]:
        """Baselines first (base, lexical), then the adapter, with its gate, and as the product finishes it."""
        return [run for run in (self.base, self.lexical, self.adapter, self.gated, self.finished) if run is not None]

    @property
    def product(self) -> EvalRun | None:
        """The run of the answers as the product hands them out."""
        return self.finished or self.gated or self.adapter

    def columns(self) -> dict[str, dict]:
        return {run.label: run.rates for run in self.runs}

    def as_json(self) -> dict:
        result = comparison_json(self.runs)
        for key, value in (("gate", self.gate), ("engine", self.engine), ("baselines", self.baselines),
                           ("data", self.data)):
            if value is not None:
                result[key] = value
        return result

    def table(self) -> str:
        return comparison_table(self.columns())

    def generation_tokens_per_second(self) -> dict:
        return {run.label: run.tokens_per_second for run in self.runs if run.engine != LEXICAL}

    def write(self, predictions_path: Path, plot_path: Path | None = None) -> None:
        write_predictions(predictions_path, self.runs)
        if plot_path is not None:
            plot_comparison(self.columns(), plot_path)


def log_ungraded(items, path) -> None:
    """One log line when no item carries an answer key: why the correctness rates read n/a."""
    if not any(item.example.graded for item in items):
        log.info("answer correctness, gold citation precision, exact answers: n/a: no record of %s carries an "
                 "answer key (gold_documents and key_facts)", path)


def measure_behavior(config: KwanzaaConfig, model, tokenizer, data_file: str | Path | None = None,
                     with_adapter: bool = True, gate: AnswerabilityGate | None = None,
                     base_digest: str | None = None, selector: EvidenceSelector | None = None) -> BehaviorReport:
    """Score on the eval items the baselines a user could pick instead (the base model under the
    contract's grammar; the lexical rules, fitted on `data.train_file`) and, when `with_adapter`, the
    adapter; with a `gate` (applied unless gate.apply is off), the adapter once more with the gate
    holding every decision, so that all are seen side by side; with `evidence.apply` (and the artifact's
    `selector`) or `evidence.grounding_check`, those answers once more as the product finishes them.

    `inference.engine` picks the engine (`generation.engines`); the fast one derives its models from
    `model` and the checked `base_digest` of its base, and the report says which engine ran."""
    items = load_eval_items(data_file or config.data.eval_file, config.data.system_prompt,
                            max_examples=config.evaluation.max_examples)
    contract = SchemaGrammar(tokenizer)
    grammar = contract if config.evaluation.constrained_decoding else None
    options = dict(max_new_tokens=config.evaluation.max_new_tokens, batch_size=config.evaluation.batch_size)
    log.info("behavioral evaluation on %d examples", len(items))
    log_ungraded(items, data_file or config.data.eval_file)
    started = time.perf_counter()
    lexical_rules = fit_lexical_baseline(config.data.train_file, config.data.system_prompt)
    lexical = scored_run(items, lexical_rules.outputs(items), LEXICAL, engine_name=LEXICAL)
    gated = with_adapter and gate is not None and config.gate.apply
    wanted = {"base": (False, None), **({"adapter": (True, gate.layer if gated else None)} if with_adapter else {})}
    engines = choose_engines(config, model, tokenizer, base_digest=base_digest, wanted=wanted)
    base = evaluate_base(model, tokenizer, items, grammar=contract, **options, **engine_arguments(engines["base"]))
    adapter, gated_run = None, None
    if with_adapter:
        fast = engines["adapter"]
        if gated and fast.llamacpp is not None:  # one pass for both: each prompt pre-filled once
            adapter, gated_run = evaluate_with_and_without_gate(model, tokenizer, items, gate=gate, choice=fast,
                                                                grammar=grammar, **options)
        else:
            adapter = evaluate(model, tokenizer, items, label="adapter", grammar=grammar, **options,
                               **engine_arguments(fast))
            if gated:
                gated_run = evaluate(model, tokenizer, items, label="adapter+gate", gate=gate, grammar=grammar,
                                     **options, **engine_arguments(fast))
    finished = finish_answers(config, model, tokenizer, items, gated_run or adapter, selector) if with_adapter else None
    report = BehaviorReport(base=base, adapter=adapter, seconds=time.perf_counter() - started, gated=gated_run,
                            gate=gate.describe() if gate is not None else None,
                            engine={label: choice.describe() for label, choice in engines.items()}, lexical=lexical,
                            baselines={"base": "the base model under the contract's grammar",
                                       LEXICAL: lexical_rules.describe()}, finished=finished,
                            data={"file": str(data_file or config.data.eval_file), "records": len(items)})
    log.info("behavioral metrics:\n%s", report.table())
    return report


def finish_answers(config: KwanzaaConfig, model, tokenizer, items, answers: EvalRun,
                   selector: EvidenceSelector | None) -> EvalRun | None:
    """`answers` as the product hands them out (`evidence.apply` with the `selector`, `evidence.grounding_check`),
    scored as a run of their own; None when neither acts."""
    settings = config.evidence
    reads = selector is not None and settings.apply != "none"
    if settings.apply != "none" and selector is None:
        log.warning("evidence.apply is %s but there is no evidence selector (no artifact's, none fitted): the "
                    "answers are left as generated", settings.apply)
    if not (reads or settings.grounding_check):
        return None
    evidences = select_evidence(model, tokenizer, answers, items, selector) if reads else None
    return finished_run(answers, items, f"{answers.label}+evidence", evidences=evidences, mode=settings.apply,
                        grounding=settings.grounding_check)


def save_eval_output(report: BehaviorReport, output: Path) -> Path:
    """`eval --output FILE`: the rates as JSON, eval_predictions.jsonl beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")
    report.write(output.parent / "eval_predictions.jsonl", output.with_suffix(".png"))
    return output
