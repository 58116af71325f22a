"""Pictures of a run: training curves for the run directory and the model card."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def _series(history: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(history: list[dict], path: Path, title: str = "") -> Path:
    """Loss and eval loss, learning rate, gradient norm per optimizer step, as one PNG."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    loss_ax, lr_ax, grad_ax = axes
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(history, key)
        if steps:
            loss_ax.plot(steps, values, style, label=label, markersize=4)
    loss_ax.set_title("Loss")
    loss_ax.legend()
    for ax, key, name in ((lr_ax, "learning_rate", "Learning rate"), (grad_ax, "grad_norm", "Gradient norm")):
        steps, values = _series(history, key)
        ax.plot(steps, values, "-", color="tab:green" if key == "learning_rate" else "tab:red")
        ax.set_title(name)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
