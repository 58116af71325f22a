"""The pure arithmetic of bench/throughput.py, unit-tested without training anything.

The model-FLOP count of LoRA training, real sample lengths of a batch, each side's rates and their
medians over runs, the final JSON summary, the target checks, and the side-by-side table.
"""

from __future__ import annotations

import statistics

TARGETS = {"ratio": 1.5, "loss_tolerance": 0.02, "hash_ratio": 0.8, "batched_gen_ratio": 3.0}
LABELS = {"ours": "ours", "trl": "TRL", "trl_tuned": "TRL tuned"}
SUMMARY_KEYS = ("cpu_class", "precision", "peak_tflops", "runs", "ours_real_tok_s", "trl_real_tok_s",
                "trl_tuned_real_tok_s", "ratio", "ratio_tuned", "real_tok_s_spread", "ours_peak_rss_mb",
                "trl_peak_rss_mb", "trl_tuned_peak_rss_mb", "ours_final_loss", "trl_final_loss",
                "trl_tuned_final_loss", "hash_ratio", "batched_gen_ratio", "mfu")


def lora_parameter_count(shapes: dict[str, tuple[int, int]], targets: list[str], r: int, layers: int) -> int:
    """Trainable LoRA parameters: r x (in + out) per targeted projection per layer."""
    return layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def training_flops(*, block_linear_params: int, lora_params: int, layers: int, hidden: int, vocab: int,
                   real_tokens: int, supervised_tokens: int, sum_squared_lengths: int) -> float:
    """Model FLOPs of LoRA training on a frozen base, for the work the objective needs.

    Per real token: 2 N (forward) + 2 N (input gradients; a frozen base computes no weight
    gradients) over the block projections, and 6 per LoRA parameter (forward, input and weight
    gradients). The tied vocabulary head only where a label is supervised: 2 V h forward + 2 V h
    backward. Causal attention, QK^T and AV, half the square: 2 T^2 h per layer forward, x3 for
    training. Recomputation (gradient checkpointing) is not model work and is not counted.
    """
    per_token = 4 * block_linear_params + 6 * lora_params
    head = 4 * vocab * hidden * supervised_tokens
    attention = 3 * 2 * layers * hidden * sum_squared_lengths
    return float(per_token * real_tokens + head + attention)


def sequence_lengths(input_ids_shape: tuple[int, int], attention_mask=None, position_ids=None) -> list[int]:
    """Real lengths of the samples in a batch: attention-mask row sums, or segments of packed position_ids."""
    if attention_mask is not None:
        return [int(n) for n in attention_mask.sum(dim=1).tolist()]
    if position_ids is not None:
        lengths = []
        for row in position_ids.tolist():
            starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
            lengths += [b - a for a, b in zip(starts, starts[1:]) if b > a]
        return lengths
    rows, width = input_ids_shape
    return [width] * rows


def side_metrics(result: dict, peak_flops: float) -> dict:
    """Rates of one side's raw counts: tokens/s over the training loop, model FLOP/s and MFU."""
    seconds = result["train_seconds"]
    flops = training_flops(**result["flops_inputs"])
    return {
        "supervised_tok_s": result["supervised_tokens"] / seconds,
        "real_tok_s": result["real_tokens"] / seconds,
        "model_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / peak_flops if peak_flops else None,
    }


def median_run(runs: list[dict], peak_flops: float) -> dict:
    """Medians over one side's runs of its rates and measurements, with the real tokens/s spread."""
    metrics = [side_metrics(run, peak_flops) for run in runs]
    rates = [m["real_tok_s"] for m in metrics]
    return {
        "real_tok_s": statistics.median(rates),
        "real_tok_s_spread": [min(rates), max(rates)],
        "supervised_tok_s": statistics.median(m["supervised_tok_s"] for m in metrics),
        "model_tflops": statistics.median(m["model_tflops"] for m in metrics),
        "mfu": statistics.median(m["mfu"] for m in metrics) if peak_flops else None,
        "peak_rss_mb": statistics.median(run["peak_rss_mb"] for run in runs),
        "final_loss": statistics.median(run["final_loss"] for run in runs),
        "train_seconds": statistics.median(run["train_seconds"] for run in runs),
        "wall_seconds": statistics.median(run["wall_seconds"] for run in runs),
        "train_loss": statistics.median(run["train_loss"] for run in runs) if all(
            run.get("train_loss") is not None for run in runs) else None,
        "real_tokens": runs[0]["real_tokens"], "supervised_tokens": runs[0]["supervised_tokens"],
        "steps": runs[0]["steps"], "runs": len(runs),
    }


def summarize(results: dict[str, list[dict]], peak_flops: float, machine: dict, hash_ratio: float | None,
              batched_gen_ratio: float | None) -> dict:
    """The final JSON object (keys in SUMMARY_KEYS order): medians of every side's runs, and their spreads.

    `machine`: {"cpu_class", "precision"} as the parent resolved them.
    """
    m = {side: median_run(runs, peak_flops) for side, runs in results.items()}
    return {
        "cpu_class": machine["cpu_class"],
        "precision": machine["precision"],
        "peak_tflops": round(peak_flops / 1e12, 3),
        "runs": min(len(runs) for runs in results.values()),
        "ours_real_tok_s": round(m["ours"]["real_tok_s"], 1),
        "trl_real_tok_s": round(m["trl"]["real_tok_s"], 1),
        "trl_tuned_real_tok_s": round(m["trl_tuned"]["real_tok_s"], 1),
        "ratio": round(m["ours"]["real_tok_s"] / m["trl"]["real_tok_s"], 3),
        "ratio_tuned": round(m["ours"]["real_tok_s"] / m["trl_tuned"]["real_tok_s"], 3),
        "real_tok_s_spread": {side: [round(v, 1) for v in m[side]["real_tok_s_spread"]] for side in m},
        "ours_peak_rss_mb": round(m["ours"]["peak_rss_mb"], 1),
        "trl_peak_rss_mb": round(m["trl"]["peak_rss_mb"], 1),
        "trl_tuned_peak_rss_mb": round(m["trl_tuned"]["peak_rss_mb"], 1),
        "ours_final_loss": round(m["ours"]["final_loss"], 4),
        "trl_final_loss": round(m["trl"]["final_loss"], 4),
        "trl_tuned_final_loss": round(m["trl_tuned"]["final_loss"], 4),
        "hash_ratio": None if hash_ratio is None else round(hash_ratio, 3),
        "batched_gen_ratio": None if batched_gen_ratio is None else round(batched_gen_ratio, 2),
        "mfu": None if m["ours"]["mfu"] is None else round(m["ours"]["mfu"], 4),
    }


def target_checks(summary: dict) -> dict[str, bool | None]:
    """Each target: met (True), missed (False) or not measured (None), against TRL's defaults and tuned TRL."""
    def check(value, test):
        return None if value is None else bool(test(value))

    checks = {}
    for side, ratio in (("TRL", "ratio"), ("TRL tuned", "ratio_tuned")):
        key = side.lower().replace(" ", "_")
        checks[f"real tokens/s ratio to {side} >= {TARGETS['ratio']}"] = summary[ratio] >= TARGETS["ratio"]
        checks[f"peak RSS ours <= {side}"] = summary["ours_peak_rss_mb"] <= summary[f"{key}_peak_rss_mb"]
        checks[f"final loss ours <= {side} x {1 + TARGETS['loss_tolerance']}"] = (
            summary["ours_final_loss"] <= summary[f"{key}_final_loss"] * (1 + TARGETS["loss_tolerance"]))
    checks[f"hash ratio >= {TARGETS['hash_ratio']}"] = check(summary["hash_ratio"],
                                                             lambda v: v >= TARGETS["hash_ratio"])
    checks[f"batched generation >= {TARGETS['batched_gen_ratio']:.0f}x"] = check(
        summary["batched_gen_ratio"], lambda v: v >= TARGETS["batched_gen_ratio"])
    return checks


def format_table(results: dict[str, list[dict]], peak_flops: float) -> str:
    """Side-by-side table of the medians, the real tokens/s spread, and ours/TRL ratios."""
    m = {side: median_run(runs, peak_flops) for side, runs in results.items()}
    sides = list(m)
    rows = [
        ("supervised tokens/s", "supervised_tok_s", "{:.1f}"),
        ("real tokens/s", "real_tok_s", "{:.1f}"),
        ("training loop, s (eval passes excluded)", "train_seconds", "{:.1f}"),
        ("wall time, s", "wall_seconds", "{:.1f}"),
        ("peak RSS, MB", "peak_rss_mb", "{:.0f}"),
        ("final loss (eval, assistant tokens)", "final_loss", "{:.4f}"),
        ("train loss (Trainer's last logged)", "train_loss", "{:.4f}"),
        ("model TFLOP/s", "model_tflops", "{:.3f}"),
        ("MFU (of the measured peak)", "mfu", "{:.2%}"),
        ("real tokens", "real_tokens", "{:d}"),
        ("supervised tokens", "supervised_tokens", "{:d}"),
        ("optimizer steps", "steps", "{:d}"),
        ("runs", "runs", "{:d}"),
    ]
    header = ("metric (median of runs)", *(LABELS[s] for s in sides), *(f"ours/{LABELS[s]}" for s in sides[1:]))
    lines = [header]
    for name, key, fmt in rows:
        values = [m[side][key] for side in sides]
        cells = [name, *(_fmt(fmt, v) for v in values)]
        for other in values[1:]:
            numeric = isinstance(values[0], (int, float)) and isinstance(other, (int, float)) and other
            cells.append(f"{values[0] / other:.2f}x" if numeric else "-")
        lines.append(tuple(cells))
    spread = ["real tokens/s min-max", *(f"{a:.1f}-{b:.1f}" for a, b in (m[s]["real_tok_s_spread"] for s in sides))]
    lines.append(tuple(spread + ["-"] * (len(header) - len(spread))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)
