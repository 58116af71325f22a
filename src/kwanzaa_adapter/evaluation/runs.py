"""Behavioral evaluation: generate for the eval items (`generation.decoding`), score, compare, report.

One loaded `PeftModel` serves both sides of the comparison: the base run happens inside
`disable_adapter()`, so base and adapter see the same weights, prompts and decoding settings.
Prompts come from `render_record`, the renderer training uses, so the model is evaluated on the
format it was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.evaluation.eval_set import EvalItem
from kwanzaa_adapter.evaluation.metrics import aggregate, score_example
from kwanzaa_adapter.generation.decoding import generate
from kwanzaa_adapter.generation.gate import AnswerabilityGate, decision_label
from kwanzaa_adapter.generation.grammar import SchemaGrammar

PREDICTIONS_FILE = "eval_predictions.jsonl"


@dataclass(frozen=True)
class EvalRun:
    """One model's evaluation: the four rates, one row per item, and generation speed."""

    label: str
    rates: dict
    rows: list[dict]
    tokens_per_second: float
    engine: str = "reference"



def evaluate(
    model, tokenizer, items: Sequence[EvalItem], *, max_new_tokens: int, batch_size: int, label: str,
    progress: bool = True, grammar: SchemaGrammar | None = None, gate: AnswerabilityGate | None = None,
    forced: Sequence[bool] | None = None, engine=None, engine_name: str = "reference",
) -> EvalRun:
    """Generate for every item, score each output with `metrics.score_example`, aggregate the rates.

    With a `gate` (or `forced` decisions) each row records the decision held and the gate's P(refuse).
    With an `engine` (the fast one, see `generation.engines`) it generates; each row names the engine.
    """
    result = generate(
        model, tokenizer, [item.prompt for item in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, grammar=grammar,
        gate=gate, forced=forced, engine=engine,
    )
    return _scored_run(items, result.outputs, label, result.refuse, result.refuse_probabilities,
                       result.tokens_per_second, engine_name)


def _scored_run(items: Sequence[EvalItem], outputs: Sequence[str], label: str, decided: Sequence | None,
                probabilities: Sequence | None, tokens_per_second: float, engine_name: str) -> EvalRun:
    """Each output scored as a row naming its engine (and the decision held, where there was one), aggregated."""
    decided = decided or [None] * len(items)
    probabilities = probabilities or [None] * len(items)
    rows = [{**_row(item, output, label, refuse, p), "engine": engine_name}
            for item, output, refuse, p in zip(items, outputs, decided, probabilities)]
    return EvalRun(label, aggregate(rows), rows, tokens_per_second, engine_name)


def _row(item: EvalItem, output: str, label: str, refuse: bool | None = None, probability: float | None = None) -> dict:
    parsed = parse_answer(output)
    answer = parsed.answer.model_dump(mode="json", exclude_none=True) if parsed.answer is not None else None
    verdict = score_example(item.example, output)
    return {"id": item.id, "model": label, "output": output, "parsed": answer, "parse_error": parsed.error,
            "decision": decision_label(refuse), "refuse_probability": probability, **verdict}


def evaluate_base_and_adapter(
    peft_model, tokenizer, items: Sequence[EvalItem], *, max_new_tokens: int, batch_size: int,
    base_label: str = "base", adapter_label: str = "adapter", progress: bool = True,
    grammar: SchemaGrammar | None = None, engines: Mapping | None = None,
) -> tuple[EvalRun, EvalRun]:
    """Evaluate the base model (adapter disabled) and the adapted model, from one loaded PeftModel;
    `engines` ({"base": EngineChoice, "adapter": EngineChoice}) where the fast engine generates."""
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, grammar=grammar)
    engines = engines or {}
    with peft_model.disable_adapter():
        base_run = evaluate(peft_model, tokenizer, items, label=base_label, **settings, **_engine(engines.get("base")))
    adapter_run = evaluate(peft_model, tokenizer, items, label=adapter_label, **settings,
                           **_engine(engines.get("adapter")))
    return base_run, adapter_run


def evaluate_with_and_without_gate(
    model, tokenizer, items: Sequence[EvalItem], *, gate: AnswerabilityGate, choice, max_new_tokens: int,
    batch_size: int, progress: bool = True, grammar: SchemaGrammar | None = None, labels=("adapter", "adapter+gate"),
) -> tuple[EvalRun, EvalRun]:
    """The adapter without and with its gate in one pass of the fast engine (`choice.engine`): each
    prompt is pre-filled once for both, and the two rows of a prompt decode side by side."""
    from kwanzaa_adapter.generation.decoding import _encode, end_of_turn_ids

    encoded = [_encode(tokenizer, item.prompt) for item in items]
    result = choice.engine.generate(
        tokenizer, encoded + encoded, max_new_tokens=max_new_tokens, batch_size=2 * batch_size,
        stop_ids=end_of_turn_ids(model, tokenizer), progress=progress, grammar=grammar, gate=gate,
        gated=[False] * len(items) + [True] * len(items))
    ungated, gated = slice(0, len(items)), slice(len(items), 2 * len(items))
    return (_scored_run(items, result.outputs[ungated], labels[0], None, None, result.tokens_per_second, choice.name),
            _scored_run(items, result.outputs[gated], labels[1], result.refuse[gated],
                        result.refuse_probabilities[gated], result.tokens_per_second, choice.name))


def _engine(choice) -> dict:
    return {} if choice is None else {"engine": choice.engine, "engine_name": choice.name}


# --------------------------------------------------------------------------- reports


def write_predictions(path: str | Path, runs: Sequence[EvalRun]) -> Path:
    """eval_predictions.jsonl: one line per example and model, run after run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for run in runs:
            for row in run.rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def comparison_json(base_run: EvalRun, adapter_run: EvalRun, gated_run: EvalRun | None = None) -> dict:
    """{"base": {metric: value}, "adapter": {...}[, "adapter_gate": {...}]} with the names of `aggregate`."""
    result = {"base": dict(base_run.rates), "adapter": dict(adapter_run.rates)}
    if gated_run is not None:
        result["adapter_gate"] = dict(gated_run.rates)
    return result


def comparison_table(base_rates: Mapping, adapter_rates: Mapping, gated_rates: Mapping | None = None) -> str:
    """Plain-text table: metric, base, adapter, the difference (adapter - base) and, with a gate, the
    adapter with its gate applied; None is n/a."""
    metrics = list(dict.fromkeys([*base_rates, *adapter_rates, *(gated_rates or {})]))
    header = ("metric", "base", "adapter", "difference") + (("adapter + gate",) if gated_rates is not None else ())
    body = []
    for metric in metrics:
        base, adapter = base_rates.get(metric), adapter_rates.get(metric)
        difference = adapter - base if base is not None and adapter is not None else None
        gated = (_cell(gated_rates.get(metric)),) if gated_rates is not None else ()
        body.append((metric, _cell(base), _cell(adapter), _cell(difference, signed=True), *gated))
    widths = [max(len(row[column]) for row in [header, *body]) for column in range(len(header))]
    lines = [_table_line(header, widths), _table_line(tuple("-" * w for w in widths), widths)]
    lines += [_table_line(row, widths) for row in body]
    return "\n".join(lines)


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _table_line(cells: tuple[str, ...], widths: list[int]) -> str:
    first, *rest = cells
    return "  ".join([first.ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(rest, widths[1:]))])


def plot_comparison(base_rates: Mapping, adapter_rates: Mapping, path: str | Path,
                    gated_rates: Mapping | None = None) -> Path:
    """Grouped bar chart of the rates, base vs adapter (and adapter + gate), values on the bars; PNG."""
    # The object-oriented Figure renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys([*base_rates, *adapter_rates, *(gated_rates or {})]))
    figure = Figure(figsize=(max(6.0, 2.2 * len(metrics)), 4.5), layout="constrained")
    axes = figure.add_subplot()
    sides = [("base", base_rates, "#9e9e9e"), ("adapter", adapter_rates, "#1f77b4")]
    if gated_rates is not None:
        sides.append(("adapter + gate", gated_rates, "#2ca02c"))
    width = 0.8 / len(sides)
    for offset, (label, rates, color) in enumerate(sides):
        values = [rates.get(metric) for metric in metrics]
        positions = [i + (offset - (len(sides) - 1) / 2) * width for i in range(len(metrics))]
        bars = axes.bar(positions, [v or 0.0 for v in values], width, label=label, color=color)
        axes.bar_label(bars, labels=[_cell(v) for v in values], padding=2, fontsize=9)
    axes.set_xticks(range(len(metrics)), [m.removesuffix("_rate").replace("_", "\n") for m in metrics])
    axes.set_ylim(0.0, 1.1)
    axes.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("rate")
    axes.set_title("Behavioral metrics: base vs adapter" + (" (and its gate)" if gated_rates is not None else ""))
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path
