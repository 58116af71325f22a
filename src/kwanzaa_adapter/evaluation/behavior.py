"""Base model versus base+adapter on an eval set: used at the end of training and by `eval`."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.evaluation.runs import (
    EvalRun,
    comparison_json,
    comparison_table,
    evaluate,
    evaluate_base_and_adapter,
    evaluate_with_and_without_gate,
    plot_comparison,
    write_predictions,
)
from kwanzaa_adapter.generation.engines import choose_engines
from kwanzaa_adapter.generation.gate import AnswerabilityGate
from kwanzaa_adapter.generation.grammar import SchemaGrammar

log = logging.getLogger(__name__)
COMPARISON_PLOT = "behavior_comparison.png"


@dataclass
class BehaviorReport:
    base: EvalRun
    adapter: EvalRun | None
    seconds: float = 0.0  # every generation pass and its scoring
    gated: EvalRun | None = None  # the adapter with its answerability gate, beside it without
    gate: dict | None = None  # the gate's description (layer, threshold, calibration AUC)
    engine: dict | None = None  # which engine generated each run, and why the reference if it did

    @property
    def runs(self) -> list[EvalRun]:
        return [run for run in (self.base, self.adapter, self.gated) if run is not None]

    def as_json(self) -> dict:
        if self.adapter is None:
            return {"base": self.base.rates}
        result = comparison_json(self.base, self.adapter, self.gated)
        if self.gate is not None:
            result["gate"] = self.gate
        if self.engine is not None:
            result["engine"] = self.engine
        return result

    def table(self) -> str:
        return comparison_table(self.base.rates, self.adapter.rates if self.adapter else {},
                                self.gated.rates if self.gated else None)

    def generation_tokens_per_second(self) -> dict:
        return {run.label: run.tokens_per_second for run in self.runs}

    def write(self, predictions_path: Path, plot_path: Path | None = None) -> None:
        write_predictions(predictions_path, self.runs)
        if plot_path is not None and self.adapter is not None:
            plot_comparison(self.base.rates, self.adapter.rates, plot_path, self.gated.rates if self.gated else None)


def measure_behavior(config: KwanzaaConfig, model, tokenizer, data_file: str | Path | None = None,
                     with_adapter: bool = True, gate: AnswerabilityGate | None = None,
                     base_digest: str | None = None) -> BehaviorReport:
    """Generate on the eval items with the base model and, when `with_adapter`, with the adapter too;
    with a `gate` (applied unless gate.apply is off), the adapter once more with the gate holding
    every decision, so that both are seen side by side.

    `inference.engine` picks the engine (`generation.engines`); the fast one derives its models from
    `model` and the checked `base_digest` of its base, and the report says which engine ran."""
    items = load_eval_items(data_file or config.data.eval_file, config.data.system_prompt,
                            max_examples=config.evaluation.max_examples)
    grammar = SchemaGrammar(tokenizer) if config.evaluation.constrained_decoding else None
    options = dict(max_new_tokens=config.evaluation.max_new_tokens, batch_size=config.evaluation.batch_size,
                   grammar=grammar)
    log.info("behavioral evaluation on %d examples", len(items))
    started = time.perf_counter()
    gated = with_adapter and gate is not None and config.gate.apply
    wanted = {"base": (False, None), **({"adapter": (True, gate.layer if gated else None)} if with_adapter else {})}
    engines = choose_engines(config, model, tokenizer, base_digest=base_digest, wanted=wanted)
    base_engine = {"engine": engines["base"].engine, "engine_name": engines["base"].name}
    adapter, gated_run = None, None
    if not with_adapter:
        base = evaluate(model, tokenizer, items, label="base", **options, **base_engine)
    else:
        fast = engines["adapter"]
        if gated and fast.engine is not None:  # one pass for both: each prompt pre-filled once
            base = evaluate(model, tokenizer, items, label="base", **options, **base_engine)
            adapter, gated_run = evaluate_with_and_without_gate(model, tokenizer, items, gate=gate, choice=fast,
                                                                **options)
        else:
            base, adapter = evaluate_base_and_adapter(model, tokenizer, items, **options, engines=engines)
            if gated:
                gated_run = evaluate(model, tokenizer, items, label="adapter+gate", gate=gate, **options,
                                     engine=fast.engine, engine_name=fast.name)
    report = BehaviorReport(base, adapter, time.perf_counter() - started, gated_run,
                            gate.describe() if gate is not None else None,
                            {label: choice.describe() for label, choice in engines.items()})
    log.info("behavioral metrics:\n%s", report.table())
    return report


def save_eval_output(report: BehaviorReport, output: Path) -> Path:
    """`eval --output FILE`: the rates as JSON, eval_predictions.jsonl beside it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report.as_json(), indent=2, sort_keys=True) + "\n")
    report.write(output.parent / "eval_predictions.jsonl", output.with_suffix(".png"))
    return output
