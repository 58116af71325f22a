"""Behavioral evaluation: generate for the eval items (`generation.decoding`), score, compare, report.

One loaded `PeftModel` serves both sides of the comparison: the base run happens inside
`disable_adapter()`, so base and adapter see the same weights, prompts and decoding settings.
Prompts come from `render_record`, the renderer training uses, so the model is evaluated on the
format it was trained on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from kwanzaa_adapter.contract import parse_answer
from kwanzaa_adapter.evaluation.eval_set import EvalItem
from kwanzaa_adapter.evaluation.metrics import aggregate, score_example
from kwanzaa_adapter.generation.decoding import generate
from kwanzaa_adapter.generation.evidence import answered, finish_answer
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
    forced: Sequence[bool] | None = None, llamacpp=None, engine_name: str = "reference",
) -> EvalRun:
    """Generate for every item, score each output with `metrics.score_example`, aggregate the rates.

    With a `gate` (or `forced` decisions) each row records the decision held and the gate's P(refuse).
    With `llamacpp` (the fast engine, see `generation.engines`) it generates; each row names the engine.
    """
    result = generate(
        model, tokenizer, [item.prompt for item in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, grammar=grammar,
        gate=gate, forced=forced, llamacpp=llamacpp,
    )
    return scored_run(items, result.outputs, label, result.refuse, result.refuse_probabilities,
                      result.tokens_per_second, engine_name)


def scored_run(items: Sequence[EvalItem], outputs: Sequence[str], label: str, decided: Sequence | None = None,
               probabilities: Sequence | None = None, tokens_per_second: float = 0.0,
               engine_name: str = "reference") -> EvalRun:
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


def evaluate_base(peft_model, tokenizer, items: Sequence[EvalItem], *, label: str = "base", llamacpp=None,
                  **settings) -> EvalRun:
    """The base model (the adapter disabled, on the reference path; the fast engine's base is a model of
    its own) on the items, with `evaluate`'s `settings`."""
    with peft_model.disable_adapter() if hasattr(peft_model, "disable_adapter") else contextlib.nullcontext():
        return evaluate(peft_model, tokenizer, items, label=label, llamacpp=llamacpp, **settings)


def evaluate_with_and_without_gate(
    model, tokenizer, items: Sequence[EvalItem], *, gate: AnswerabilityGate, choice, max_new_tokens: int,
    batch_size: int, progress: bool = True, grammar: SchemaGrammar | None = None, labels=("adapter", "adapter+gate"),
) -> tuple[EvalRun, EvalRun]:
    """The adapter without and with its gate in one pass of the fast engine (`choice.llamacpp`): each
    prompt is pre-filled once for both, and the two rows of a prompt decode side by side."""
    from kwanzaa_adapter.generation.decoding import _encode, end_of_turn_ids

    encoded = [_encode(tokenizer, item.prompt) for item in items]
    result = choice.llamacpp.generate(
        tokenizer, encoded + encoded, max_new_tokens=max_new_tokens, batch_size=2 * batch_size,
        stop_ids=end_of_turn_ids(model, tokenizer), progress=progress, grammar=grammar, gate=gate,
        gated=[False] * len(items) + [True] * len(items))
    ungated, gated = slice(0, len(items)), slice(len(items), 2 * len(items))
    return (scored_run(items, result.outputs[ungated], labels[0], None, None, result.tokens_per_second, choice.name),
            scored_run(items, result.outputs[gated], labels[1], result.refuse[gated],
                       result.refuse_probabilities[gated], result.tokens_per_second, choice.name))


def finished_run(run: EvalRun, items: Sequence[EvalItem], label: str, *, evidences: Sequence | None = None,
                 mode: str = "none", grounding: bool = False) -> EvalRun:
    """`run`'s outputs as the product hands them out (`evidence.finish_answer`, with one `Evidence` or None per
    item), scored again; each row keeps the decision that was held."""
    evidences = evidences or [None] * len(items)
    outputs = [finish_answer(row["output"], item.example.documents, evidence=evidence, mode=mode, grounding=grounding)
               for row, item, evidence in zip(run.rows, items, evidences)]
    decided = [None if row["decision"] is None else row["decision"] == "refuse" for row in run.rows]
    return scored_run(items, outputs, label, decided, [row["refuse_probability"] for row in run.rows],
                      run.tokens_per_second, run.engine)


def select_evidence(model, tokenizer, run: EvalRun, items: Sequence[EvalItem], selector, progress: bool = True) -> list:
    """The selector's evidence for each item `run` answered (None for the others): one reference forward pass
    each, the adapter on."""
    chosen = [i for i, row in enumerate(run.rows) if answered(row["output"])]
    with tqdm(total=len(chosen), desc="reading the evidence", unit="prompt", disable=not progress) as bar:
        found = selector.select(model, tokenizer, [items[i].prompt for i in chosen],
                                [items[i].example.documents for i in chosen], progress=bar.update) if chosen else []
    evidences = [None] * len(items)
    for i, evidence in zip(chosen, found):
        evidences[i] = evidence
    return evidences


def engine_arguments(choice) -> dict:
    """`evaluate`'s engine arguments for an `EngineChoice` (none: the reference path)."""
    return {} if choice is None else {"llamacpp": choice.llamacpp, "engine_name": choice.name}


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


def run_key(label: str) -> str:
    """A run's key in JSON and metrics names: 'adapter+gate' -> 'adapter_gate'."""
    return label.replace("+", "_").replace(" ", "_")


def comparison_json(runs: Sequence[EvalRun]) -> dict:
    """{"base": {metric: value}, "lexical": {...}, "adapter": {...}, "adapter_gate": {...}}: the runs given,
    keyed by `run_key`, with the names of `aggregate`."""
    return {run_key(run.label): dict(run.rates) for run in runs}


def comparison_table(columns: Mapping[str, Mapping]) -> str:
    """Plain-text table: one row per metric, one column per run ({label: rates}, in order); None is n/a."""
    metrics = list(dict.fromkeys(metric for rates in columns.values() for metric in rates))
    header = ("metric", *columns)
    body = [(metric, *(_cell(rates.get(metric)) for rates in columns.values())) for metric in metrics]
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


COLORS = {"base": "#9e9e9e", "lexical": "#ff7f0e", "adapter": "#1f77b4", "adapter+gate": "#2ca02c",
          "adapter+evidence": "#9467bd", "adapter+gate+evidence": "#d62728"}


def comparison_figure(columns: Mapping[str, Mapping], title: str = "Behavioral metrics"):
    """Grouped bar chart of the rates, one bar per run ({label: rates}, in order), values on the bars: a
    matplotlib Figure (the object-oriented API renders with Agg without touching pyplot's global backend)."""
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys(metric for rates in columns.values() for metric in rates))
    figure = Figure(figsize=(max(6.0, 0.35 * len(metrics) * max(1, len(columns)) + 2.5), 4.8), layout="constrained")
    axes = figure.add_subplot()
    width = 0.8 / max(1, len(columns))
    for offset, (label, rates) in enumerate(columns.items()):
        values = [rates.get(metric) for metric in metrics]
        positions = [i + (offset - (len(columns) - 1) / 2) * width for i in range(len(metrics))]
        bars = axes.bar(positions, [v or 0.0 for v in values], width, label=label, color=COLORS.get(label))
        axes.bar_label(bars, labels=[_cell(v) for v in values], padding=2, fontsize=7, rotation=90)
    axes.set_xticks(range(len(metrics)), [m.removesuffix("_rate").replace("_", "\n") for m in metrics], fontsize=8)
    axes.set_ylim(0.0, 1.2)
    axes.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("rate")
    axes.set_title(f"{title}: {', '.join(columns)}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return figure


def plot_comparison(columns: Mapping[str, Mapping], path: str | Path, title: str = "Behavioral metrics") -> Path:
    """`comparison_figure` as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    comparison_figure(columns, title).savefig(path, format="png", dpi=120)
    return path
