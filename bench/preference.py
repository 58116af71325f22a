"""What the preference stage buys: continue a trained adapter with `training.preference`, then measure it.

    python bench/preference.py --adapter outputs/kwanzaa-demo/final_artifact [--config configs/demo.yaml]
                               [--set training.preference.beta=0.2 ...] [--no-preference] [--out DIR]

The supervised stage is the same in every variant, so it is trained once (`train --config ...`) and
each variant of the preference stage starts from its artifact here: the 4-bit base and the artifact's
adapter, trainable, go through exactly the stage the workflow runs (`preference.run_preference`:
mining, near-miss pairs, TRL's DPOTrainer). Then, for the adapter:

- the four contract rates on the eval split and on the second eval set (`--heldout`), greedy;
- `bench/decision.py`'s separation (ROC AUC of the refusal probability) on both sets.

`--no-preference` measures the artifact as it is (the supervised-only row). Every wall time is printed
beside its figure; the last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decision import refusal_probability, summarize  # noqa: E402

from kwanzaa_adapter.config import load_training_config  # noqa: E402
from kwanzaa_adapter.evaluation.eval_set import load_eval_items
from kwanzaa_adapter.evaluation.runs import evaluate  # noqa: E402
from kwanzaa_adapter.training.checkpointing import RunIdentity  # noqa: E402

RATES = ("json_validity_rate", "citation_rate", "refusal_correctness_rate", "retrieval_groundedness_rate")


def trainable_adapter(config, artifact: Path):
    """The artifact's adapter on the 4-bit base, prepared as the workflow prepares it, trainable."""
    from peft import PeftModel

    from kwanzaa_adapter.modeling import loading as modeling
    from kwanzaa_adapter.safety.artifacts import verify_artifact

    report = verify_artifact(artifact)
    if not report.ok:
        raise SystemExit(f"{artifact}: not a valid artifact:\n{report.format()}")
    precision = modeling.run_precision(config, "cpu")
    base, tokenizer, source = modeling.load_base_model(config, "cpu", precision.resolved)
    if config.quantization.load_in_4bit:
        base = modeling.prepare_quantized_base(base, config, False)
    model = PeftModel.from_pretrained(base, str(artifact), is_trainable=True)
    return SimpleNamespace(model=model, tokenizer=tokenizer, source=source, device="cpu", parameters={},
                           gradient_checkpointing=False, precision=precision)


def measure(config, model, tokenizer, path: Path) -> dict:
    """Contract rates (greedy, the run's generation settings) and separation on one eval file."""
    items = load_eval_items(path, config.data.system_prompt)
    started = time.perf_counter()
    run = evaluate(model, tokenizer, items, label="adapter", max_new_tokens=config.evaluation.max_new_tokens,
                   batch_size=config.evaluation.batch_size)
    generation = time.perf_counter() - started
    refuse = [item.example.expect_refusal for item in items]
    scores = [refusal_probability(model, tokenizer, item, "The documents do not") for item in items]
    expected = {item.id: item.example.expect_refusal for item in items}
    wrong = {"answered_unanswerable": sum(expected[r["id"]] and r["json_valid"] and not r["refused"] for r in run.rows),
             "refused_answerable": sum(not expected[r["id"]] and r["refused"] for r in run.rows)}
    return {"file": str(path), "items": len(items), **{k: round(run.rates[k], 3) if run.rates[k] is not None else None
                                                       for k in RATES},
            **wrong, "separation": summarize(scores, refuse, 0.5), "generation_seconds": round(generation, 1),
            "tokens_per_second": round(run.tokens_per_second, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a supervised artifact (final_artifact)")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--no-preference", action="store_true", help="measure the artifact as it is")
    parser.add_argument("--heldout", type=Path, default=Path("data/kwanzaa_heldout.jsonl"))
    parser.add_argument("--out", type=Path, default=Path("outputs/bench-preference"))
    args = parser.parse_args()

    config = load_training_config(args.config, ("training.preference.enabled=true", *args.overrides))
    bundle = trainable_adapter(config, args.adapter)
    stage = None
    if not args.no_preference:
        from kwanzaa_adapter.training.preference import run_preference

        args.out.mkdir(parents=True, exist_ok=True)
        identity = RunIdentity(config.digest(), {}, "bench")
        stage = run_preference(config, bundle, SimpleNamespace(path=args.out), identity)
        for r in stage["rounds"]:
            print(f"round {r['round']}: {r['pairs']} pairs ({r['errors']}, near-miss {r['near_miss']}); "
                  f"mining {r['generation_seconds']} s, DPO {r['steps']} steps in {r['train_seconds']} s "
                  f"({r['train_tokens']} tokens), loss {r['final_loss']}, reward accuracy {r['reward_accuracy']}")
    bundle.model.eval()
    results = {}
    for name, path in (("eval", Path(config.data.eval_file)), ("heldout", args.heldout)):
        results[name] = measure(config, bundle.model, bundle.tokenizer, path)
        row = results[name]
        print(f"{name}: " + ", ".join(f"{k} {row[k]}" for k in (*RATES, "answered_unanswerable", "refused_answerable"))
              + f", auc {row['separation']['auc']}; generation {row['generation_seconds']} s")
    print(json.dumps({"adapter": str(args.adapter), "overrides": args.overrides, "preference": stage, **results}))


if __name__ == "__main__":
    main()
