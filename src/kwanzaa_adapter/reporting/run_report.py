"""`report.html`: what a run trained, what it proved, how it trained and how its adapter behaves, with the
answers behind the rates; one self-contained page (pictures inline as SVG, no script, font or request).

Written by every training run into its run directory and by `kwanzaa-adapter report`. The report is not
part of the sealed artifact: it shows the artifact's verification, so it is written after the artifact is
sealed, and it reads the run directory's training log and predictions, which the artifact does not carry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from kwanzaa_adapter.evaluation.eval_set import EvaluationDataError, load_eval_items
from kwanzaa_adapter.evaluation.metrics import aggregate
from kwanzaa_adapter.evaluation.runs import PREDICTIONS_FILE, comparison_figure
from kwanzaa_adapter.reporting.answers import KINDS, group_answers
from kwanzaa_adapter.reporting.figures import gate_figure, phases_figure, svg
from kwanzaa_adapter.reporting.proofs import artifact_proofs, cpu_class
from kwanzaa_adapter.tracking.monitoring import training_curves_figure

log = logging.getLogger(__name__)
REPORT_FILE = "report.html"
ARTIFACT_DIRNAME = "final_artifact"
EVALS_DIRNAME = "evals"  # eval outputs kept with the run: evals/NAME/metrics.json (`eval --output`)
GATED = "adapter+gate"


class ReportError(ValueError):
    """A path that is neither a run directory nor an artifact, or a file the report cannot read."""


@dataclass
class EvalSetView:
    """One eval set: every variant's rates (recomputed from its rows, as `eval` computes them) and answers."""

    name: str
    file: str
    columns: dict[str, dict]
    chart: str
    groups: list = field(default_factory=list)
    note: str | None = None
    rows: dict[str, list[dict]] = field(default_factory=dict)  # each variant's rows, by label
    examples: dict = field(default_factory=dict)  # {id: example} of the set's file (empty when unreadable)


def locate(path: str | Path) -> tuple[Path | None, Path]:
    """(run directory or None, artifact) for a run directory or an artifact directory."""
    path = Path(path)
    if (path / ARTIFACT_DIRNAME / "metadata.json").is_file():
        return path, path / ARTIFACT_DIRNAME
    if (path / "metadata.json").is_file():
        parent = path.parent
        return (parent if (parent / "metrics_history.jsonl").is_file() else None), path
    raise ReportError(f"{path}: neither a run directory (with {ARTIFACT_DIRNAME}/metadata.json) nor an artifact "
                      "(with metadata.json)")


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None


def _jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as exc:
                        raise ReportError(f"{path}:{number}: not JSON: {exc}") from None
    except OSError as exc:
        raise ReportError(f"{path}: cannot read: {exc}") from None
    return rows


def _examples(file: str) -> tuple[dict, str | None]:
    """{id: example} of an eval file, or ({}, why not); the prompts' rendering does not matter here."""
    try:
        return {item.id: item.example for item in load_eval_items(file)}, None
    except (OSError, EvaluationDataError) as exc:
        return {}, f"questions and document titles are not shown: {exc}"


def eval_set_view(name: str, file: str, rows: list[dict], prefix: str) -> EvalSetView:
    """The rows of eval_predictions.jsonl (every variant, run after run) as one set's view."""
    by_label: dict[str, list[dict]] = {}
    for row in rows:
        by_label.setdefault(row["model"], []).append(row)
    columns = {label: aggregate(found) for label, found in by_label.items()}
    examples, note = _examples(file)
    product = list(by_label)[-1]  # runs are written baselines first, the product's answers last
    groups = [group_answers(product, by_label[product], examples, f"{prefix}-{product.replace('+', '-')}")]
    chart = svg(comparison_figure(columns, title=name))
    return EvalSetView(name, file, columns, chart, groups, note, by_label, examples)


def eval_sets(run_dir: Path | None, metadata: dict, extra: tuple[Path, ...]) -> list[EvalSetView]:
    """The run's own eval split, then each `eval --output` kept under the run (evals/*/metrics.json) or named."""
    views = []
    if run_dir is not None and (run_dir / PREDICTIONS_FILE).is_file():
        file = metadata.get("datasets", {}).get("eval", {}).get("file", "")
        views.append(eval_set_view(f"eval split ({Path(file).name})", file, _jsonl(run_dir / PREDICTIONS_FILE),
                                   "set0"))
    kept = sorted((run_dir / EVALS_DIRNAME).glob("*/metrics.json")) if run_dir is not None else []
    for number, path in enumerate([*kept, *extra], start=1):
        data = _json(Path(path)).get("data", {})
        file = data.get("file", "")
        predictions = Path(path).parent / PREDICTIONS_FILE
        views.append(eval_set_view(Path(file).name or Path(path).parent.name, file, _jsonl(predictions),
                                   f"set{number}"))
    return views


def phase_seconds(timings: dict, total: float | None = None) -> dict[str, float]:
    """A run's wall time split by phase, as the dry run's estimate splits it (metadata.json's timings)."""
    eval_loss = timings.get("eval_loss_seconds") or 0.0
    phases = {"training": (timings.get("train_seconds") or 0.0) - eval_loss, "eval-loss passes": eval_loss}
    if timings.get("gate_seconds") is not None:
        phases["gate fitting"] = timings["gate_seconds"]
    phases["behavioral evaluation"] = timings.get("behavioral_seconds") or 0.0
    total = timings.get("total_seconds") or 0.0 if total is None else total
    return {"load, checksums, artifact": max(0.0, total - sum(phases.values())), **phases}


def gate_view(metadata: dict, sets: list[EvalSetView]) -> dict | None:
    """The gate's block, threshold and calibration, and its probabilities on the first set (the run's eval
    split) by class."""
    gate = metadata.get("gate")
    if not gate:
        return None
    view = {"layer": gate["layer"], "threshold": gate["threshold"], "auc": gate.get("calibration_auc"),
            "examples": gate.get("examples"), "refusals": gate.get("refusals"), "chart": None}
    if not sets:
        return view
    rows = [r for r in sets[0].rows.get(GATED, []) if r.get("refuse_probability") is not None]
    classes = {True: [], False: []}
    for row in rows:
        example = sets[0].examples.get(row["id"])
        if example is not None:
            classes[example.expect_refusal].append(row["refuse_probability"])
    if rows and (classes[True] or classes[False]):
        view["chart"] = svg(gate_figure(classes[False], classes[True], gate["threshold"]))
        view["set"] = sets[0].name
    return view


def build_context(path: str | Path, extra_evals: tuple[Path, ...] = ()) -> dict:
    """Everything the template shows, read from the run directory and its artifact."""
    run_dir, artifact = locate(path)
    metadata = _json(artifact / "metadata.json")
    metrics = _json(artifact / "training_metrics.json")
    history = _jsonl(run_dir / "metrics_history.jsonl") if run_dir is not None else []
    timings = metadata.get("timings", {})
    measured = phase_seconds(timings)
    estimated = timings.get("estimate")
    sets = eval_sets(run_dir, metadata, tuple(extra_evals))
    return {
        "metadata": metadata, "summary": metrics.get("summary") or {}, "artifact": str(artifact),
        "cpu": cpu_class(metadata),
        "datasets": metadata.get("datasets", {}), "proofs": artifact_proofs(artifact, metadata, run_dir),
        "curves": svg(training_curves_figure(history)) if history else None,
        "phases": [(name, seconds, (estimated or {}).get(name)) for name, seconds in measured.items()],
        "phases_chart": svg(phases_figure(measured, estimated)) if timings else None,
        "estimated": estimated, "sets": sets, "gate": gate_view(metadata, sets),
        "kinds": KINDS, "baselines": (metrics.get("behavioral") or {}).get("baselines"),
    }


def render(context: dict) -> str:
    environment = jinja2.Environment(loader=jinja2.PackageLoader("kwanzaa_adapter.reporting", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                                     lstrip_blocks=True)
    environment.filters["rate"] = lambda v: "n/a" if v is None else f"{v:.3f}"
    environment.filters["short"] = lambda digest: (digest or "")[:16]
    environment.filters["minutes"] = lambda s: "n/a" if s is None else (f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s")
    return environment.get_template("report.html.j2").render(**context)


def write_report(path: str | Path, output: str | Path | None = None, extra_evals: tuple[Path, ...] = ()) -> Path:
    """Write the report of the run (or artifact) at `path` to `output` (default RUN_DIR/report.html),
    atomically: a reader never sees half a page."""
    run_dir, _ = locate(path)
    if output is None:
        if run_dir is None:
            raise ReportError(f"{path}: an artifact outside its run directory: pass --output FILE")
        output = run_dir / REPORT_FILE
    html = render(build_context(path, extra_evals))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-report-", dir=output.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(handle, 0o666 & ~umask)  # as an ordinary file, not mkstemp's 0600
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(html)
        os.replace(temporary, output)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    log.info("run report: %s (%d KiB, sha256 %s)", output, len(html.encode()) // 1024,
             hashlib.sha256(html.encode()).hexdigest()[:16])
    return output
