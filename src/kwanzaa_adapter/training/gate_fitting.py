"""Step 5, last part: fit the answerability gate on decision examples the supervised stage never saw.

Every choice is made on training-side data only. The decision examples (`gate.decision_file`,
derived from the training documents by data/build_dataset.py) are first cleared of any prompt an
eval set holds. One forward pass per example (`training.read_outs`) taps the candidate blocks at the
prompt's last token;
for every (block, C) a logistic regression is cross-fitted in folds grouped by question, so that
no question's variants sit on both sides of a fold; the pair with the best cross-fitted AUC wins.
The threshold is the one that makes the fewest errors on those cross-fitted probabilities, each
kind of error weighted by how often it will be met (`gate.refusal_prior`). The winner is refitted
on every example and shipped.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.evaluation.eval_set import EvalItem, EvaluationDataError, eval_prompts, load_eval_items, user_turns
from kwanzaa_adapter.generation.gate import AnswerabilityGate

log = logging.getLogger(__name__)
GROUP_MARK = ".gate."


@dataclass
class DecisionData:
    items: list[EvalItem]
    skipped: dict = field(default_factory=dict)  # why lines were left out, with counts

    @property
    def refusals(self) -> int:
        return sum(item.example.expect_refusal for item in self.items)


@dataclass
class GateFit:
    gate: AnswerabilityGate
    candidates: list[dict]  # every (layer, C) with its cross-fitted AUC
    seconds: float

    def summary(self) -> dict:
        return {**self.gate.describe(), "seconds": round(self.seconds, 1)}


def load_decision_data(config: KwanzaaConfig) -> DecisionData:
    """The decision examples minus any whose prompt is in an eval set; at most gate.max_examples."""
    g = config.gate
    items = load_eval_items(g.decision_file, config.data.system_prompt)
    held_out: set[str] = set()
    for path in (config.data.eval_file, *g.exclude_files):
        held_out |= eval_prompts(path, config.data.system_prompt)
    kept = [item for item in items if user_turns(item) not in held_out]
    skipped = Counter({"in_an_eval_set": len(items) - len(kept)})
    if g.max_examples is not None and len(kept) > g.max_examples:
        skipped["over_max_examples"] = len(kept) - g.max_examples
        kept = sorted(random.Random(config.run.seed).sample(kept, g.max_examples), key=items.index)
    labels = {item.example.expect_refusal for item in kept}
    if labels != {True, False}:
        raise EvaluationDataError(f"{g.decision_file}: the gate needs examples to answer and to refuse; "
                                  f"after leaving out eval prompts it has {len(kept)} of "
                                  f"{'one kind' if kept else 'no kind'}")
    return DecisionData(kept, {k: v for k, v in skipped.items() if v})


def question_group(item_id: str) -> str:
    """The cross-fitting group of a decision example: its question (the id before '.gate.')."""
    return item_id.split(GROUP_MARK, 1)[0]


def candidate_layers(setting: list[int] | str, depth: int) -> list[int]:
    if setting != "auto":
        return sorted(set(setting))
    # A third to two thirds of the depth: on training-side data the middle blocks separated the two kinds
    # best (../shared/ANSWERABILITY.md, cross-fitted on the training records; bench/decision.py measures
    # the last block beside them), and the forward pass stops after the deepest candidate.
    return sorted({max(1, round(depth * share)) for share in (1 / 3, 1 / 2, 2 / 3)})


def weighted_threshold(probabilities: np.ndarray, refuse: np.ndarray, prior: float) -> tuple[float, float]:
    """(threshold, weighted accuracy): refuse above it; refusal errors weigh `prior`, answer errors 1 - prior."""
    weights = np.where(refuse, prior / refuse.mean(), (1 - prior) / (1 - refuse.mean()))
    ordered = np.unique(probabilities)
    cuts = np.concatenate([[ordered[0] - 1e-6], (ordered[:-1] + ordered[1:]) / 2, [ordered[-1] + 1e-6]])
    best = max(cuts, key=lambda t: (float(np.sum(weights * ((probabilities > t) == refuse))), -abs(t - 0.5)))
    return float(best), float(np.sum(weights * ((probabilities > best) == refuse)) / np.sum(weights))


def cross_fit(features: np.ndarray, refuse: np.ndarray, groups: Sequence[str], c: float, folds: int) -> np.ndarray:
    """Out-of-fold refusal probabilities, folds grouped by question."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    return cross_val_predict(classifier(c), features, refuse, groups=list(groups), cv=GroupKFold(n_splits=folds),
                             method="predict_proba")[:, 1]


def classifier(c: float):
    """Standardised features into an L2-regularised logistic regression (inverse strength `c`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))


def fit_gate(features: dict[int, torch.Tensor], data: DecisionData, config: KwanzaaConfig, *, feature_seconds: float,
             tokens: int) -> GateFit:
    """From each candidate block's features of the decision examples: the cross-fitted choice of block and C, the
    threshold, the refit: the shipped gate."""
    from sklearn.metrics import roc_auc_score

    started = time.perf_counter()
    g = config.gate
    refuse = np.array([item.example.expect_refusal for item in data.items])
    groups = [question_group(item.id) for item in data.items]
    folds = min(g.folds, len(set(groups)))
    candidates = []
    for layer in sorted(features):
        for c in g.regularization:
            out_of_fold = cross_fit(features[layer].numpy(), refuse, groups, c, folds)
            candidates.append({"layer": layer, "C": c, "auc": round(float(roc_auc_score(refuse, out_of_fold)), 4),
                               "_probabilities": out_of_fold})
    best = max(candidates, key=lambda row: (row["auc"], row["layer"]))
    threshold, accuracy = weighted_threshold(best["_probabilities"], refuse, g.refusal_prior)
    pipeline = classifier(best["C"]).fit(features[best["layer"]].numpy(), refuse)
    scaler, regression = pipeline[0], pipeline[1]
    info = {"calibration_auc": best["auc"], "calibration_weighted_accuracy": round(accuracy, 4), "C": best["C"],
            "examples": len(refuse), "refusals": int(refuse.sum()), "groups": len(set(groups)), "folds": folds,
            "refusal_prior": g.refusal_prior, "feature_tokens": tokens, "feature_seconds": round(feature_seconds, 1),
            "skipped": data.skipped, "decision_file": str(Path(g.decision_file).name),
            "candidates": [{k: v for k, v in row.items() if not k.startswith("_")} for row in candidates]}
    gate = AnswerabilityGate(
        layer=best["layer"], threshold=threshold,
        weight=torch.tensor(regression.coef_[0], dtype=torch.float32),
        bias=torch.tensor(regression.intercept_, dtype=torch.float32),
        mean=torch.tensor(scaler.mean_, dtype=torch.float32),
        scale=torch.tensor(scaler.scale_, dtype=torch.float32), info=info)
    seconds = feature_seconds + time.perf_counter() - started
    log.info("answerability gate: block %d, C %g, calibration AUC %.3f, threshold %.3f, %d examples (%d refuse), "
             "%.0f s (%d prompt tokens)", gate.layer, best["C"], best["auc"], threshold, len(refuse), refuse.sum(),
             seconds, tokens)
    return GateFit(gate, info["candidates"], seconds)
