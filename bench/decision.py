"""How well a model tells answerable from unanswerable questions, apart from where it draws the line.

    python bench/decision.py --adapter outputs/kwanzaa-demo/final_artifact [--config configs/demo.yaml]
                             [--eval-file data/kwanzaa_eval_records.jsonl] [--refusal-opening "The documents do not"]

refusal_correctness_rate mixes two things: how well the model separates the two kinds of question
(discrimination) and where it puts its threshold (bias). Adding refusals to the training data moves
the threshold; only better reading moves the separation. This script measures the separation.

For every eval item it teacher-forces the gold answer's JSON up to the opening quote of
`answer.text` and reads the probability that the text goes on with the refusal opening (every
refusal in the shipped data starts "The documents do not say"). From these scores, for the base
model and for base + adapter:

- `auc`: ROC AUC against `expect_refusal` (0.5 is chance, 1.0 separates every pair);
- `errors_at_half`: wrong decisions when p > 0.5 means refuse;
- `errors_at_best`: wrong decisions at the threshold that makes the fewest on these very items
  (an optimistic floor for what moving the bias alone could reach).

Beside them, a score that needs no model: the largest share of the question's content words found
in one sentence of one document (`lexical`). The last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_generation import load_adapter_model  # noqa: E402

from kwanzaa_adapter.evaluation.eval_set import EvalItem, load_eval_items  # noqa: E402
from kwanzaa_adapter.evaluation.metrics import content_words, split_sentences  # noqa: E402

DEFAULT_EVAL_FILE = Path("data/kwanzaa_eval_records.jsonl")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a verified artifact (final_artifact)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--eval-file", type=Path, default=DEFAULT_EVAL_FILE)
    parser.add_argument("--refusal-opening", default=DEFAULT_REFUSAL_OPENING)
    args = parser.parse_args()

    items = [item for item in load_eval_items(args.eval_file) if item.reference is not None]
    refuse = [item.example.expect_refusal for item in items]
    model, tokenizer = load_adapter_model(args.config, args.adapter)
    model.eval()
    adapter = [refusal_probability(model, tokenizer, item, args.refusal_opening) for item in items]
    with model.disable_adapter():
        base = [refusal_probability(model, tokenizer, item, args.refusal_opening) for item in items]
    # A question whose words a sentence holds is less likely unanswerable: negate to score refusal.
    lexical = [-lexical_score(item.example.question, item.example.documents) for item in items]

    summary = {
        "items": len(items), "unanswerable": sum(refuse),
        "adapter": summarize(adapter, refuse, 0.5), "base": summarize(base, refuse, 0.5),
        "lexical": summarize(lexical, refuse, None),
    }
    print(f"{len(items)} items, {sum(refuse)} unanswerable ({args.eval_file})")
    print(f"{'score':<10} {'auc':>6} {'errors at p=0.5':>16} {'errors at best threshold':>25}")
    for name in ("base", "adapter", "lexical"):
        row = summary[name]
        print(f"{name:<10} {row['auc']:>6.3f} {row.get('errors_at_half', '-'):>16} {row['errors_at_best']:>25}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
