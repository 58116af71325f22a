"""Answer or refuse: how well each way of deciding separates the two kinds, and what it does to the rates.

    python bench/decision.py --adapter outputs/kwanzaa-demo/final_artifact [--config configs/demo.yaml]
                             [--layers 10,15,20,24,30] [--skip-generation]

Rows, each on the eval split and on the second eval set (data/kwanzaa_heldout_records.jsonl):

- `own`: the generation's own decision (gate off). Its score is the teacher-forced probability that
  answer.text opens with "The documents do not" (every training refusal does);
- `calibrated`: that same probability, with a threshold chosen on the decision examples
  (`gate.decision_file`, prompts the supervised stage never saw) instead of the generation's own;
- `shipped`: the gate inside the artifact, as `eval`, `generate`, `chat` and `serve` apply it;
- `block L end|prefix`: a gate fitted here exactly as the workflow fits one (C cross-fitted by
  question on the decision examples, threshold on those cross-fitted probabilities), on block L at
  the prompt's end or after the answer's fixed opening; the last block is among them;
- `diagnostic`: the generation's score at the threshold that makes the fewest errors on the very
  items scored. It is chosen on the eval items: a floor for moving the threshold alone, not a method.

Every choice is made on the decision examples; the eval sets are read only to be scored. For each
row: AUC, wrong decisions by kind (an answer where the documents do not hold one, by refusal kind;
a refusal where they do) and the rates. The rates come from generation held to each decision: every
eval item is generated once forced to answer and once forced to refuse (`generate(..., forced=)`),
so any row's outputs are its decisions' picks; `own` is its own pass. Decoding follows
`evaluation.constrained_decoding` (off in the demo config), so json validity is that of an
unconstrained pass. The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_class  # noqa: E402
from decision_scan import POSITIONS, scan  # noqa: E402

from kwanzaa_adapter.backend.models import model_from_config  # noqa: E402
from kwanzaa_adapter.config import load_training_config  # noqa: E402
from kwanzaa_adapter.evaluation.eval_set import EvalItem, load_eval_items  # noqa: E402
from kwanzaa_adapter.evaluation.metrics import aggregate, content_words, score_all, score_example, split_sentences  # noqa: E402
from kwanzaa_adapter.generation.decoding import generate  # noqa: E402
from kwanzaa_adapter.generation.gate import GATE_FILE  # noqa: E402
from kwanzaa_adapter.generation.grammar import SchemaGrammar  # noqa: E402
from kwanzaa_adapter.training.gate_fitting import (  # noqa: E402
    classifier,
    cross_fit,
    load_decision_data,
    question_group,
    weighted_threshold,
)

DEFAULT_EVAL_FILE = Path("data/kwanzaa_eval_records.jsonl")
HELDOUT_FILE = Path("data/kwanzaa_heldout_records.jsonl")
SOURCE_DIR = Path("data/source")
DEFAULT_REFUSAL_OPENING = "The documents do not"
TEXT_KEY = '"text":"'


def roc_auc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Share of (positive, negative) pairs whose positive scores higher; ties count half."""
    pos = [s for s, p in zip(scores, positives) if p]
    neg = [s for s, p in zip(scores, positives) if not p]
    if not pos or not neg:
        raise ValueError("AUC needs at least one item of each kind")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def errors_at(scores: Sequence[float], positives: Sequence[bool], threshold: float) -> int:
    """Wrong decisions when a score above `threshold` means positive."""
    return sum((s > threshold) != p for s, p in zip(scores, positives))


def fewest_errors(scores: Sequence[float], positives: Sequence[bool]) -> int:
    """Wrong decisions at the best threshold for these items (every distinct score, and below all)."""
    thresholds = [min(scores) - 1.0, *sorted(set(scores))]
    return min(errors_at(scores, positives, t) for t in thresholds)


def lexical_score(question: str, documents) -> float:
    """Largest share of the question's content words that one document sentence holds."""
    asked = content_words(question)
    if not asked:
        return 0.0
    sentences = (s for doc in documents for s in split_sentences(doc.text))
    return max((len(content_words(s) & asked) / len(asked) for s in sentences), default=0.0)


def answer_prefix(reference: str) -> str:
    """The gold answer's JSON up to and including the opening quote of answer.text."""
    at = reference.find(TEXT_KEY)
    if at < 0:
        raise ValueError(f"the gold answer has no {TEXT_KEY!r}: {reference[:80]!r}")
    return reference[: at + len(TEXT_KEY)]


@torch.no_grad()
def refusal_probability(model, tokenizer, item: EvalItem, opening: str) -> float:
    """P(answer.text starts with `opening` | prompt, gold JSON up to answer.text), teacher-forced."""
    prompt = list(tokenizer.apply_chat_template(item.prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    prefix = answer_prefix(item.reference)
    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    full = tokenizer(prefix + opening, add_special_tokens=False)["input_ids"]
    if full[: len(head)] != head:
        raise ValueError(f"{item.id}: the refusal opening merges with the JSON before it into one token")
    ids = torch.tensor([prompt + full], device=model.device)
    start = len(prompt) + len(head)
    logits = model(input_ids=ids, logits_to_keep=ids.shape[1] - start + 1).logits[0, :-1].float()
    log_probs = logits.log_softmax(-1).gather(-1, ids[0, start:, None]).squeeze(-1)
    return math.exp(log_probs.sum().item())


def summarize(scores: Sequence[float], positives: Sequence[bool], half: float | None) -> dict:
    result = {"auc": round(roc_auc(scores, positives), 3), "errors_at_best": fewest_errors(scores, positives)}
    if half is not None:
        result["errors_at_half"] = errors_at(scores, positives, half)
    return result


def refusal_kinds(source_dir: Path = SOURCE_DIR) -> dict[str, str]:
    """Question id -> refusal kind, from the dataset's authored sources."""
    kinds = {}
    for name in ("questions.jsonl", "heldout_questions.jsonl"):
        for line in (source_dir / name).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                kinds[row["id"]] = row.get("refusal") or "answerable"
    return kinds


def wrong_by_kind(refuse: Sequence[bool], expected: Sequence[bool], kinds: Sequence[str]) -> dict[str, int]:
    wrong = Counter()
    for decided, due, kind in zip(refuse, expected, kinds):
        if decided != due:
            wrong["refused, answer due" if not due else f"answered, {kind}"] += 1
    return dict(sorted(wrong.items()))


def picked_rates(items: Sequence[EvalItem], outputs: dict[bool, list[str]], refuse: Sequence[bool]) -> dict:
    """The rates of the outputs generated under each item's decision."""
    verdicts = [score_example(item.example, outputs[decided][i]) for i, (item, decided) in enumerate(zip(items, refuse))]
    return aggregate(verdicts)


def fitted_gate(features: np.ndarray, refuse: np.ndarray, groups: list[str], config) -> tuple:
    """(classifier, threshold, cross-fitted AUC): the workflow's procedure on one block and position."""
    from sklearn.metrics import roc_auc_score

    folds = min(config.gate.folds, len(set(groups)))
    tried = [(roc_auc_score(refuse, p := cross_fit(features, refuse, groups, c, folds)), c, p)
             for c in config.gate.regularization]
    auc, c, out_of_fold = max(tried, key=lambda t: t[0])
    threshold, _ = weighted_threshold(out_of_fold, refuse, config.gate.refusal_prior)
    return classifier(c).fit(features, refuse), threshold, auc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a verified artifact (final_artifact)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--eval-files", type=Path, nargs="+", default=[DEFAULT_EVAL_FILE, HELDOUT_FILE])
    parser.add_argument("--layers", default="10,15,20,24,30", help="blocks to fit gates on, beside the shipped one")
    parser.add_argument("--refusal-opening", default=DEFAULT_REFUSAL_OPENING)
    parser.add_argument("--skip-generation", action="store_true", help="separation only, no rates")
    args = parser.parse_args()

    config = load_training_config(args.config)
    loaded = model_from_config(config, adapter=args.adapter)
    model, tokenizer, shipped = loaded.model, loaded.tokenizer, loaded.gate
    if shipped is None:
        raise SystemExit(f"{args.adapter} has no answerability gate ({GATE_FILE}); train with gate.fit: true")
    layers = sorted({int(n) for n in args.layers.split(",")} | {shipped.layer})
    started = time.perf_counter()
    decision = load_decision_data(config).items
    sets = {"decision": decision, **{path.stem: load_eval_items(path, config.data.system_prompt)
                                     for path in args.eval_files}}
    scans = {name: scan(model, tokenizer, items, layers, args.refusal_opening, label=name)
             for name, items in sets.items()}
    scan_seconds = time.perf_counter() - started
    kinds = refusal_kinds()
    refuse_of = {name: np.array([item.example.expect_refusal for item in items]) for name, items in sets.items()}
    groups = [question_group(item.id) for item in decision]

    # Every row's P(refuse) on every set, and its threshold: all chosen on the decision examples.
    rows: dict[str, dict] = {}
    rows["own"] = {"scores": {n: s.refusal_probability for n, s in scans.items()}, "threshold": None}
    calibrated, _ = weighted_threshold(scans["decision"].refusal_probability, refuse_of["decision"],
                                       config.gate.refusal_prior)
    rows["calibrated"] = {"scores": rows["own"]["scores"], "threshold": calibrated}
    rows["shipped"] = {"scores": {n: shipped.refuse_probability(torch.from_numpy(s.features[(shipped.layer, "end")]))
                                  .numpy() for n, s in scans.items()}, "threshold": shipped.threshold,
                       "block": shipped.layer}
    for layer in layers:
        for position in POSITIONS:
            pipeline, threshold, auc = fitted_gate(scans["decision"].features[(layer, position)],
                                                   refuse_of["decision"], groups, config)
            rows[f"block {layer} {position}"] = {
                "scores": {n: pipeline.predict_proba(s.features[(layer, position)])[:, 1] for n, s in scans.items()},
                "threshold": threshold, "cross_fit_auc": round(float(auc), 3)}

    evaluated = [name for name in sets if name != "decision"]
    outputs = {}
    if not args.skip_generation:
        grammar = SchemaGrammar(tokenizer) if config.evaluation.constrained_decoding else None
        options = dict(max_new_tokens=config.evaluation.max_new_tokens, batch_size=config.evaluation.batch_size,
                       grammar=grammar)
        for name in evaluated:
            prompts = [item.prompt for item in sets[name]]
            own = generate(model, tokenizer, prompts, **options)
            forced = {d: generate(model, tokenizer, prompts, forced=[d] * len(prompts), **options).outputs
                      for d in (True, False)}
            outputs[name] = (own.outputs, forced)
    summary = {"cpu": cpu_class(), "precision": loaded.precision.resolved, "scan_seconds": round(scan_seconds),
               "items": {n: len(items) for n, items in sets.items()}, "rows": {}}
    for label, row in [*rows.items(), ("diagnostic", rows["own"])]:
        result = {"threshold": row["threshold"], **{k: v for k, v in row.items() if k not in ("scores", "threshold")}}
        for name in evaluated:
            scores, expected = row["scores"][name], refuse_of[name]
            item_kinds = [kinds.get(item.id, "answerable") for item in sets[name]]
            if label == "own":  # what the generation did; without generation, its score above one half
                refuse = [score_example(item.example, out)["refused"] for item, out in zip(sets[name], outputs[name][0])] \
                    if outputs else [bool(s > 0.5) for s in scores]
            elif label == "diagnostic":  # the threshold with the fewest errors on these very items
                best = min([min(scores) - 1.0, *sorted(set(scores))], key=lambda t: errors_at(scores, expected, t))
                refuse = [bool(s > best) for s in scores]
            else:
                refuse = [bool(s > row["threshold"]) for s in scores]
            entry = {"auc": round(roc_auc(list(scores), list(expected)), 3), "wrong": wrong_by_kind(refuse, expected, item_kinds)}
            if outputs:
                own_outputs, forced = outputs[name]
                entry["rates"] = aggregate(score_all([i.example for i in sets[name]], own_outputs)) if label == "own" \
                    else picked_rates(sets[name], forced, refuse)
            result[name] = entry
        summary["rows"][label] = result
    print_table(summary, evaluated)
    print(json.dumps(summary, default=float))




def print_table(summary: dict, evaluated: list[str]) -> None:
    print(f"CPU {summary['cpu']}, {summary['precision']}; features and refusal scores in {summary['scan_seconds']} s "
          f"for {sum(summary['items'].values())} prompts")
    names = ("json_validity_rate", "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate",
             "gold_citation_rate")
    short = ("json", "cite", "refusal", "ground", "gold")
    for name in evaluated:
        print(f"\n{name} ({summary['items'][name]} items)")
        print(f"{'row':<18} {'thresh':>7} {'auc':>6}  " + " ".join(f"{s:>7}" for s in short) + "  wrong decisions")
        for label, row in summary["rows"].items():
            entry = row[name]
            rates = entry.get("rates", {})
            threshold = "-" if row["threshold"] is None else f"{row['threshold']:.3f}"
            cells = " ".join(f"{rates[n]:>7.3f}" if rates.get(n) is not None else f"{'-':>7}" for n in names)
            wrong = ", ".join(f"{k} {v}" for k, v in entry["wrong"].items()) or "none"
            print(f"{label:<18} {threshold:>7} {entry['auc']:>6.3f}  {cells}  {sum(entry['wrong'].values())}: {wrong}")


if __name__ == "__main__":
    main()
