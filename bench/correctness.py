"""Is the answer right? The adapter and its levers against the baselines, on every eval set, in one table.

    python bench/correctness.py --adapter outputs/kwanzaa-demo/final_artifact [--config configs/demo.yaml]
        [--sets data/kwanzaa_eval.jsonl,data/kwanzaa_heldout.jsonl,data/kwanzaa_paraphrase.jsonl]
        [--fit-evidence] [--json FILE]

For each set, one behavioral evaluation (`measure_behavior`, every finishing step off) gives the
baselines (the base model under the contract's grammar, the lexical rules), the adapter and the
adapter with its gate; the levers that act after generation are then applied to the gated answers
(the evidence selector citing or holding the text, the grounding check, and both), each scored by the
same scorer. The selector is the artifact's, or with --fit-evidence (or where the artifact has none) one
fitted now on the config's decision examples. Each row gives the seconds its lever added (the selector's
reading pass over the answered prompts and the checks, not generation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_class  # noqa: E402

from kwanzaa_adapter.backend.models import model_from_config  # noqa: E402
from kwanzaa_adapter.config import load_training_config  # noqa: E402
from kwanzaa_adapter.evaluation.behavior import measure_behavior  # noqa: E402
from kwanzaa_adapter.evaluation.eval_set import load_eval_items  # noqa: E402
from kwanzaa_adapter.evaluation.runs import finished_run, select_evidence  # noqa: E402
from kwanzaa_adapter.generation.evidence import load_evidence_selector  # noqa: E402

SETS = "data/kwanzaa_eval.jsonl,data/kwanzaa_heldout.jsonl,data/kwanzaa_paraphrase.jsonl"
COLUMNS = ("answer_correctness_rate", "gold_citation_precision", "exact_answer_rate", "refusal_correctness_rate",
           "json_validity_rate", "retrieval_groundedness_rate")
SHORT = {"answer_correctness_rate": "correct", "gold_citation_precision": "gold prec", "exact_answer_rate": "exact",
         "refusal_correctness_rate": "refusal", "json_validity_rate": "json", "retrieval_groundedness_rate": "grounded"}
LEVERS = {"+ evidence cites": ("cite", False), "+ evidence holds text": ("hold", False),
          "+ grounding check": ("none", True), "+ cite + grounding": ("cite", True)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--sets", default=SETS)
    parser.add_argument("--fit-evidence", action="store_true", help="fit the selector on the config's train file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--json", help="write the table as JSON lines here")
    args = parser.parse_args(argv)
    config = load_training_config(args.config, ("evidence.apply=none", "evidence.grounding_check=false", *args.set))
    served = model_from_config(config, adapter=args.adapter)
    selector = load_evidence_selector(args.adapter)
    if args.fit_evidence or selector is None:
        from kwanzaa_adapter.training.read_outs import fit_read_outs

        fitting = load_training_config(args.config, ("gate.fit=false", "evidence.fit=true", *args.set))
        _, selector = fit_read_outs(served.model, served.tokenizer, fitting)
    rows = []
    for data_file in args.sets.split(","):
        items = load_eval_items(data_file, config.data.system_prompt)
        started = time.perf_counter()
        report = measure_behavior(config, served.model, served.tokenizer, data_file, gate=served.gate,
                                  base_digest=served.base_digest)
        seconds = time.perf_counter() - started
        runs = [(run, None) for run in report.runs]
        product = report.gated or report.adapter
        selecting = time.perf_counter()
        evidences = select_evidence(served.model, served.tokenizer, product, items, selector)
        selecting = time.perf_counter() - selecting
        for label, (mode, grounding) in LEVERS.items():
            lever_started = time.perf_counter()
            run = finished_run(product, items, f"{product.label} {label}", evidences=evidences, mode=mode,
                               grounding=grounding)
            runs.append((run, time.perf_counter() - lever_started + (selecting if mode != "none" else 0.0)))
        for run, lever_seconds in runs:
            rows.append({"set": Path(data_file).stem, "variant": run.label, "engine": run.engine,
                         **{k: run.rates.get(k) for k in COLUMNS},
                         "seconds": round(lever_seconds, 2) if lever_seconds is not None else None})
        print(f"{data_file}: evaluated in {seconds:.0f} s", flush=True)
    print(f"\nCPU class {cpu_class()}; selector {selector.describe()}")
    header = f"{'set':<20} {'variant':<40} " + " ".join(f"{SHORT[k]:>9}" for k in COLUMNS) + "  lever s"
    print(header + "\n" + "-" * len(header))
    for row in rows:
        cells = " ".join(f"{row[k]:9.3f}" if row[k] is not None else f"{'n/a':>9}" for k in COLUMNS)
        extra = f"  {row['seconds']:.2f}" if row["seconds"] is not None else ""
        print(f"{row['set']:<20} {row['variant']:<40} {cells}{extra}")
    if args.json:
        Path(args.json).write_text("".join(json.dumps(row) + "\n" for row in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
