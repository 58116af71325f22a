"""What proving the fast engine's model costs: the logit check on the probe prompts, timed on a real artifact.

Before a derived GGUF answers for the first time in a process, llama.cpp's logits on two probe prompts are
compared with the verified model's (`generation.logit_check`). This loads an artifact as `serve` does, with
`inference.engine: llama.cpp`, and prints the check (its seconds included) for the adapter and for the base,
as one JSON line each, beside the CPU class. Median of --runs loads.

    python bench/derived_check.py --config configs/demo.yaml --adapter outputs/kwanzaa-demo/final_artifact
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_class  # noqa: E402

from kwanzaa_adapter.config import load_training_config  # noqa: E402
from kwanzaa_adapter.generation.engines import choose_engine  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--adapter", default="outputs/kwanzaa-demo/final_artifact")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    from kwanzaa_adapter.backend.models import model_from_config

    config = load_training_config(args.config, ("inference.engine=llama.cpp",))
    served = model_from_config(config, adapter=args.adapter)
    for label, with_adapter in (("adapter", True), ("base", False)):
        seconds, loads, check = [], [], None
        for _ in range(args.runs):  # each a first use: the engine loaded from the cached file and checked
            choice = choose_engine(config, served.model, served.tokenizer, base_digest=served.base_digest,
                                   with_adapter=with_adapter)
            check = choice.record["logit_check"]
            seconds.append(check["seconds"])
            loads.append(check["load_seconds"])
            choice.llamacpp.close()
        print(json.dumps({"bench": "derived_check", "variant": label, "cpu_class": cpu_class(),
                          "precision": served.precision.resolved, "quant": check["quant"],
                          "check_seconds_median": statistics.median(seconds), "check_seconds": seconds,
                          "load_seconds_median": statistics.median(loads),
                          "positions": check["positions"], "max_abs_diff": round(check["max_abs_diff"], 4),
                          "tolerance": round(check["tolerance"], 4), "top1_agreement": check["top1_agreement"],
                          "passed": check["passed"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
