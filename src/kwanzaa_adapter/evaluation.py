"""Behavioral evaluation: load eval items, generate greedily in batches, score, compare, report.

One loaded `PeftModel` serves both sides of the comparison: the base run happens inside
`disable_adapter()`, so base and adapter see the same weights, prompts and decoding settings.
Prompts come from `render_record`, the renderer training uses, so the model is evaluated on the
format it was trained on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from kwanzaa_adapter.answer import parse_answer
from kwanzaa_adapter.constrained import SchemaGrammar, ContractLogits
from kwanzaa_adapter.data.records import DEFAULT_SYSTEM_PROMPT, ChatExample, Document, RagRecord, render_record
from kwanzaa_adapter.metrics import Example, aggregate, score_example

PREDICTIONS_FILE = "eval_predictions.jsonl"


class EvaluationDataError(ValueError):
    """An eval file line that cannot be evaluated; the message names file:line and the fix."""


@dataclass(frozen=True)
class EvalItem:
    """One eval example: the prompt turns to generate from and what the output is judged against."""

    id: str
    prompt: list[dict]
    example: Example
    reference: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    """Decoded outputs in prompt order; `token_ids` are the new tokens before the end-of-turn token."""

    outputs: list[str]
    new_tokens: int
    seconds: float
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class EvalRun:
    """One model's evaluation: the four rates, one row per item, and generation speed."""

    label: str
    rates: dict
    rows: list[dict]
    tokens_per_second: float


# --------------------------------------------------------------------------- loading


class _ChatMeta(BaseModel):
    """What a chat-form line's `meta` must carry to be scored; other meta keys are kept, unread."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    expect_refusal: bool
    documents: list[Document]


def load_eval_items(
    path: str | Path, system_prompt: str = DEFAULT_SYSTEM_PROMPT, max_examples: int | None = None
) -> list[EvalItem]:
    """Read eval items from a JSONL of RAG records or chat lines (SPEC section 5).

    RAG records are rendered with `system_prompt`; chat lines keep their own turns, and their
    prompt is every message before the last assistant turn.
    """
    path = Path(path)
    items: list[EvalItem] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if max_examples is not None and len(items) >= max_examples:
                break
            if line.strip():
                items.append(_parse_line(line, f"{path}:{number}", system_prompt))
    return items


def _parse_line(line: str, where: str, system_prompt: str) -> EvalItem:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvaluationDataError(f"{where}: not a JSON line ({exc.msg} at char {exc.pos})") from None
    if not isinstance(value, dict):
        raise EvaluationDataError(f"{where}: expected a JSON object, got {type(value).__name__}")
    try:
        return _chat_item(value, where) if "messages" in value else _record_item(value, system_prompt)
    except ValidationError as exc:
        raise EvaluationDataError(f"{where}: {_describe(exc)}") from None


def _record_item(value: dict, system_prompt: str) -> EvalItem:
    record = RagRecord.model_validate(value)
    prompt = render_record(record.model_copy(update={"answer": None}), system_prompt)
    reference = record.answer.to_json() if record.answer is not None else None
    return EvalItem(record.id, prompt, Example.from_record(record), reference)


def _chat_item(value: dict, where: str) -> EvalItem:
    chat = ChatExample.model_validate(value)
    meta = chat.meta or {}
    if "documents" not in meta:
        raise EvaluationDataError(
            f"{where}: chat line without meta.documents; behavioral metrics need the documents: "
            "use RAG-record form or put meta.documents"
        )
    try:
        info = _ChatMeta.model_validate(meta)
    except ValidationError as exc:
        raise EvaluationDataError(f"{where}: meta: {_describe(exc)}") from None
    last_assistant = max(i for i, m in enumerate(chat.messages) if m.role == "assistant")
    prompt = [m.model_dump() for m in chat.messages[:last_assistant]]
    if not prompt:
        raise EvaluationDataError(f"{where}: nothing before the last assistant turn to prompt with")
    example = Example(question=prompt[-1]["content"], documents=info.documents, expect_refusal=info.expect_refusal)
    return EvalItem(info.id, prompt, example, chat.messages[last_assistant].content)


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{location}: {error['msg']}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- generation


def generate(
    model,
    tokenizer,
    prompts: Sequence[list[dict]],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
    grammar: SchemaGrammar | None = None,
) -> GenerationResult:
    """Greedy, batched decoding of chat prompts; outputs come back in prompt order.

    Prompts are sorted by length so each batch pads little; decoding stops at the end-of-turn
    token, and only the new tokens are decoded and counted (padding after it is not). With a
    `grammar`, every output is held to the answer contract (constrained decoding).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1; got {batch_size} and {max_new_tokens}")
    encoded = [_encode(tokenizer, prompt) for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    stop_ids = end_of_turn_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    new_ids: list[list[int]] = [[] for _ in prompts]
    outputs: list[str] = [""] * len(prompts)
    counted = 0
    start = time.perf_counter()
    with _eval_mode(model), _left_padding(tokenizer), torch.inference_mode():
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress)
        for first in range(0, len(order), batch_size):
            indices = order[first : first + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in indices]}, return_tensors="pt").to(device)
            prompt_length = batch["input_ids"].shape[1]
            constrained = [ContractLogits(grammar, len(indices), prompt_length, stop_ids)] if grammar else []
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=pad_id,
                use_cache=True,
                stopping_criteria=StoppingCriteriaList([NotAJsonObject(tokenizer, prompt_length)]),
                logits_processor=LogitsProcessorList(constrained),
            )
            for row, index in zip(generated[:, prompt_length:].tolist(), indices):
                tokens, stopped = _until_stop(row, [*stop_ids, pad_id])
                new_ids[index] = tokens
                counted += len(tokens) + stopped
                outputs[index] = tokenizer.decode(tokens, skip_special_tokens=True)
            bar.update(len(indices))
        bar.close()
    return GenerationResult(outputs, counted, time.perf_counter() - start, new_ids)


class NotAJsonObject(StoppingCriteria):
    """Ends a sequence as soon as its output cannot be a JSON object (first visible char not '{').

    `parse_answer` rejects such an output whatever follows, so stopping there changes no metric;
    it only spares generating up to max_new_tokens of prose.
    """

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores=None, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids[:, self.prompt_length :].tolist():
            text = self.tokenizer.decode(row[:4], skip_special_tokens=True).lstrip()
            done.append(bool(text) and not text.startswith("{"))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def end_of_turn_ids(model, tokenizer) -> list[int]:
    """The tokenizer's eos plus the generation config's eos ids: any of them ends a turn."""
    ids: list[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for candidate in [tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])]:
        if candidate is not None and candidate not in ids:
            ids.append(candidate)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an eos token; set tokenizer.eos_token")
    return ids


def _encode(tokenizer, prompt: list[dict]) -> list[int]:
    encoding = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(encoding["input_ids"])


def _until_stop(row: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    for position, token in enumerate(row):
        if token in stop_ids:
            return row[:position], True
    return row, False


@contextmanager
def _left_padding(tokenizer) -> Iterator[None]:
    # Decoder-only models continue from the last position, so padding must sit on the left.
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


@contextmanager
def _eval_mode(model) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    model, tokenizer, items: Sequence[EvalItem], *, max_new_tokens: int, batch_size: int, label: str,
    progress: bool = True, grammar: SchemaGrammar | None = None,
) -> EvalRun:
    """Generate for every item, score each output with `metrics.score_example`, aggregate the rates."""
    result = generate(
        model, tokenizer, [item.prompt for item in items],
        max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, grammar=grammar,
    )
    rows = [_row(item, output, label) for item, output in zip(items, result.outputs)]
    return EvalRun(label, aggregate(rows), rows, result.tokens_per_second)


def _row(item: EvalItem, output: str, label: str) -> dict:
    parsed = parse_answer(output)
    answer = parsed.answer.model_dump(mode="json", exclude_none=True) if parsed.answer is not None else None
    verdict = score_example(item.example, output)
    return {"id": item.id, "model": label, "output": output, "parsed": answer, "parse_error": parsed.error, **verdict}


def evaluate_base_and_adapter(
    peft_model, tokenizer, items: Sequence[EvalItem], *, max_new_tokens: int, batch_size: int,
    base_label: str = "base", adapter_label: str = "adapter", progress: bool = True,
    grammar: SchemaGrammar | None = None,
) -> tuple[EvalRun, EvalRun]:
    """Evaluate the base model (adapter disabled) and the adapted model, from one loaded PeftModel."""
    settings = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress, grammar=grammar)
    with peft_model.disable_adapter():
        base_run = evaluate(peft_model, tokenizer, items, label=base_label, **settings)
    adapter_run = evaluate(peft_model, tokenizer, items, label=adapter_label, **settings)
    return base_run, adapter_run


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


def comparison_json(base_run: EvalRun, adapter_run: EvalRun) -> dict:
    """{"base": {metric: value}, "adapter": {metric: value}} with the metric names of `aggregate`."""
    return {"base": dict(base_run.rates), "adapter": dict(adapter_run.rates)}


def comparison_table(base_rates: Mapping, adapter_rates: Mapping) -> str:
    """Plain-text table: metric, base, adapter and the difference (adapter - base); None is n/a."""
    metrics = list(dict.fromkeys([*base_rates, *adapter_rates]))
    header = ("metric", "base", "adapter", "difference")
    body = []
    for metric in metrics:
        base, adapter = base_rates.get(metric), adapter_rates.get(metric)
        difference = adapter - base if base is not None and adapter is not None else None
        body.append((metric, _cell(base), _cell(adapter), _cell(difference, signed=True)))
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


def plot_comparison(base_rates: Mapping, adapter_rates: Mapping, path: str | Path) -> Path:
    """Grouped bar chart of the rates, base vs adapter, values written on the bars; saved as PNG."""
    # The object-oriented Figure renders with Agg without touching pyplot's global backend.
    from matplotlib.figure import Figure

    metrics = list(dict.fromkeys([*base_rates, *adapter_rates]))
    figure = Figure(figsize=(max(6.0, 2.2 * len(metrics)), 4.5), layout="constrained")
    axes = figure.add_subplot()
    width = 0.38
    for offset, (label, rates, color) in enumerate(
        [("base", base_rates, "#9e9e9e"), ("adapter", adapter_rates, "#1f77b4")]
    ):
        values = [rates.get(metric) for metric in metrics]
        positions = [i + (offset - 0.5) * width for i in range(len(metrics))]
        bars = axes.bar(positions, [v or 0.0 for v in values], width, label=label, color=color)
        axes.bar_label(bars, labels=[_cell(v) for v in values], padding=2, fontsize=9)
    axes.set_xticks(range(len(metrics)), [m.removesuffix("_rate").replace("_", "\n") for m in metrics])
    axes.set_ylim(0.0, 1.1)
    axes.set_yticks([0.0, 0.25, 0.5, 0.75, 1.0])
    axes.set_ylabel("rate")
    axes.set_title("Behavioral metrics: base vs adapter")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120)
    return path
