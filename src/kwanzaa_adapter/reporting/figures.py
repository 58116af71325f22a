"""The report's pictures: matplotlib Figures rendered to inline SVG (text kept as text, no external font)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import matplotlib

SVG_SETTINGS = {"svg.fonttype": "none", "svg.hashsalt": "kwanzaa-adapter", "font.family": "sans-serif"}


def svg(figure) -> str:
    """The figure as an `<svg>` element to inline in HTML (the XML prologue and DOCTYPE dropped)."""
    buffer = io.StringIO()
    with matplotlib.rc_context(SVG_SETTINGS):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def phases_figure(measured: Mapping[str, float], estimated: Mapping[str, float] | None):
    """Each phase's wall time, measured beside the dry run's estimate (horizontal bars, minutes)."""
    from matplotlib.figure import Figure

    names = list(measured)
    figure = Figure(figsize=(8, 0.45 * len(names) + 1.2), layout="constrained")
    axes = figure.add_subplot()
    height = 0.38 if estimated else 0.6
    rows = range(len(names))
    axes.barh([r - (height / 2 if estimated else 0) for r in rows], [measured[n] / 60 for n in names], height,
              label="measured", color="#1f77b4")
    if estimated:
        axes.barh([r + height / 2 for r in rows], [estimated.get(n, 0.0) / 60 for n in names], height,
                  label="estimated (dry run)", color="#bbbbbb")
    axes.set_yticks(list(rows), names)
    axes.invert_yaxis()
    axes.set_xlabel("minutes")
    axes.grid(axis="x", alpha=0.3)
    axes.legend(loc="lower right", frameon=False)
    return figure


def gate_figure(answerable: Sequence[float], unanswerable: Sequence[float], threshold: float):
    """The gate's P(refuse) on the eval prompts, one strip per class, with the threshold it refuses above."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 2.6), layout="constrained")
    axes = figure.add_subplot()
    for row, (values, label, color) in enumerate(((answerable, "answerable", "#1f77b4"),
                                                   (unanswerable, "should refuse", "#d62728"))):
        # a fixed jitter (golden-ratio steps) spreads the points without randomness
        jitter = [((i * 0.618034) % 1.0 - 0.5) * 0.5 for i in range(len(values))]
        axes.scatter(list(values), [row + j for j in jitter], s=14, alpha=0.7, color=color,
                     label=f"{label} ({len(values)})")
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axes.text(threshold, 1.45, f" threshold {threshold:.3f}: refuse above", fontsize=8, va="center")
    axes.set_yticks([0, 1], ["answerable", "should refuse"])
    axes.set_ylim(-0.6, 1.7)
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("P(refuse) from the gate")
    axes.grid(axis="x", alpha=0.3)
    return figure
