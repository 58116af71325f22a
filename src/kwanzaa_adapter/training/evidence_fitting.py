"""Step 5, beside the gate: fit the evidence selector on the decision examples' gold answers.

Training-side data only: the answerable decision examples (`gate.decision_file`, cleared of every eval
prompt like the gate's) carry their question's gold answer for the documents they show. The pass that
reads the gate's features reads the question's attention to every sentence too (`generation.reading`),
so the selector costs no forward pass of its own. The gold sentence of an answer sentence is the
sentence of the document it cites that shares the most content words with it (gold answers stay close
to the wording of the document they cite, data/README.md); every other sentence is a negative. The
regularisation is chosen by top-1 accuracy cross-fitted over questions, then the selector is refitted
on every example and shipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kwanzaa_adapter.contract import CITATION_MARKER, parse_answer
from kwanzaa_adapter.data.words import content_words, split_sentences
from kwanzaa_adapter.evaluation.eval_set import EvalItem, EvaluationDataError
from kwanzaa_adapter.generation.evidence import Candidate, EvidenceSelector, as_features, candidates

log = logging.getLogger(__name__)
REGULARIZATION = (0.03, 0.1, 0.3)


@dataclass
class EvidenceData:
    features: np.ndarray  # one row per candidate sentence
    gold: np.ndarray  # whether the candidate is a gold sentence
    groups: np.ndarray  # the question each candidate's example asks (cross-fitting folds)
    examples: np.ndarray  # the example each candidate belongs to (top-1 accuracy)


def gold_sentences(item: EvalItem) -> set[tuple[int, int]]:
    """(document, sentence index) of every sentence the item's gold answer rests on."""
    answer = parse_answer(item.reference or "").answer
    if answer is None or answer.is_refusal:
        return set()
    found = candidates(item.example.documents)
    gold = set()
    for sentence in split_sentences(answer.answer.text):
        words = content_words(sentence)
        for number in {int(n) for n in CITATION_MARKER.findall(sentence)}:
            own = [c for c in found if c.document == number]
            if own and words:
                best = max(own, key=lambda c: (len(words & content_words(c.sentence)), -c.index))
                gold.add((best.document, best.index))
    return gold


def evidence_data(items: Sequence[EvalItem], found: Sequence[list[Candidate]], attention: Sequence[torch.Tensor],
                  groups: Sequence[str]) -> EvidenceData:
    """Features and gold labels of every candidate of the items whose gold answer cites a sentence."""
    rows, labels, group_of, example_of = [], [], [], []
    for example, (item, cands, mass, group) in enumerate(zip(items, found, attention, groups)):
        gold = gold_sentences(item)
        if gold:
            rows.append(as_features(mass).numpy())
            labels += [(c.document, c.index) in gold for c in cands]
            group_of += [group] * len(cands)
            example_of += [example] * len(cands)
    if not rows:
        raise EvaluationDataError("no decision example carries a gold answer citing its documents; the evidence "
                                  "selector is fitted on such examples (data/build_dataset.py writes them)")
    return EvidenceData(np.concatenate(rows), np.array(labels), np.array(group_of), np.array(example_of))


def top1_accuracy(scores: np.ndarray, data: EvidenceData) -> float:
    """Share of examples whose best-scored candidate is a gold sentence."""
    hits = [bool(data.gold[rows][int(np.argmax(scores[rows]))])
            for rows in (data.examples == example for example in np.unique(data.examples))]
    return float(np.mean(hits))


SECOND_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
NEVER = 1.01  # a `second` threshold no probability reaches


def second_threshold(scores: np.ndarray, data: EvidenceData) -> tuple[float, float]:
    """(threshold, mean F1): the runner-up joins the best at or above it; the one whose chosen sentences match
    each example's gold sentences best (F1 of the two sets, averaged over examples), never on ties."""
    def mean_f1(threshold: float) -> float:
        f1s = []
        for rows in (data.examples == example for example in np.unique(data.examples)):
            order = np.argsort(-scores[rows], kind="stable")
            picked = order[:1].tolist() + [i for i in order[1:2] if scores[rows][i] >= threshold]
            hits = int(data.gold[rows][picked].sum())
            f1s.append(2 * hits / (len(picked) + int(data.gold[rows].sum())))
        return float(np.mean(f1s))
    return max(((t, mean_f1(t)) for t in (NEVER, *SECOND_THRESHOLDS)), key=lambda pair: (round(pair[1], 6), pair[0]))


def fit_evidence_selector(data: EvidenceData, depth: int, folds: int = 5) -> EvidenceSelector:
    """The selector over blocks 1..`depth`, its C chosen by top-1 accuracy cross-fitted in folds by question, and
    its `second` threshold by the F1 of the chosen sentences on the same cross-fitted probabilities."""
    from sklearn.model_selection import GroupKFold, cross_val_predict

    from kwanzaa_adapter.training.gate_fitting import classifier

    started = time.perf_counter()
    folds = min(folds, len(np.unique(data.groups)))
    tried = []
    for c in REGULARIZATION:
        scores = cross_val_predict(classifier(c), data.features, data.gold, groups=data.groups,
                                   cv=GroupKFold(n_splits=folds), method="predict_proba")[:, 1]
        tried.append({"C": c, "top1": round(top1_accuracy(scores, data), 4), "_scores": scores})
    best = max(tried, key=lambda row: (row["top1"], -row["C"]))
    second, f1 = second_threshold(best["_scores"], data)
    pipeline = classifier(best["C"]).fit(data.features, data.gold)
    scaler, regression = pipeline[0], pipeline[1]
    info = {"calibration_top1": best["top1"], "calibration_f1": round(f1, 4), "C": best["C"],
            "examples": int(len(np.unique(data.examples))),
            "questions": int(len(np.unique(data.groups))),
            "candidates": int(len(data.gold)), "gold": int(data.gold.sum()),
            "tried": [{k: v for k, v in row.items() if not k.startswith("_")} for row in tried],
            "fit_seconds": round(time.perf_counter() - started, 2)}
    log.info("evidence selector: blocks 1-%d, cross-fitted top-1 accuracy %.3f over %d questions (C %g), a second "
             "sentence at P >= %.2f (F1 %.3f)", depth, best["top1"], info["questions"], best["C"], second, f1)
    return EvidenceSelector(depth=depth, second=second, weight=torch.tensor(regression.coef_[0], dtype=torch.float32),
                            bias=torch.tensor(regression.intercept_, dtype=torch.float32),
                            mean=torch.tensor(scaler.mean_, dtype=torch.float32),
                            scale=torch.tensor(scaler.scale_, dtype=torch.float32), info=info)
