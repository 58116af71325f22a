"""Reliability figures: kill-and-resume trials, the hostile-input corpus, and a server flood.

    python bench/reliability.py                 # everything (~10-15 minutes on 2 CPU cores)
    python bench/reliability.py --timers 0      # only the fault-hook kills, no timer kills

1. Crash and resume, on a tiny random 2-layer Llama (4-bit, LoRA dropout 0.1, batch 2 x
   accumulation 2, 6 steps over 2 epochs, checkpoints every 2 steps, 2 kept): one uninterrupted
   run, then one trial per fault point of tests/reliability/crash.py (mid-step, inside the
   accumulation window, during checkpoint saves and rotation, during artifact creation and the
   final verification) and `--timers` trials killed at seeded random times. Each trial is a
   `train` subprocess killed with SIGKILL, a look for partial checkpoints or artifacts, a
   `train --resume` (or a fresh `train` when no checkpoint was complete), and a byte comparison
   of adapter_model.safetensors with the uninterrupted run's.
2. The hostile-input corpus (tests/reliability/corpus.py), one CLI subprocess per case,
   time-boxed: tracebacks, hangs, and exits other than the expected 1 or 2.
3. The server (API key, default limits) over the uninterrupted run's artifact, flooded with the
   bad requests of tests/reliability/flood.py, then asked a good question.

Subprocesses run with OMP_NUM_THREADS=1. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

from conftest import build_tiny_model, packaged_gguf_path, write_run_config  # noqa: E402
from tests.reliability.corpus import HostileCase, build_corpus  # noqa: E402
from tests.reliability.crash import (  # noqa: E402
    FAULT_POINTS,
    KILL_RUN,
    Trial,
    child_env,
    kill_and_resume,
    reference_run,
)

HOSTILE_TIME_BOX_S = 120


def tiny_model(directory: Path) -> Path:
    from transformers import AutoTokenizer

    gguf = packaged_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    build_tiny_model("llama", len(tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def crash_trials(root: Path, timers: int, seed: int) -> tuple[list[Trial], Path, float]:
    config = write_run_config(root, tiny_model(root / "model"), **KILL_RUN)
    cache = root / "cache"
    reference, seconds = reference_run(config, root / "reference", cache)
    print(f"uninterrupted run: {seconds:.1f} s", flush=True)
    plan = [(label, point, None) for label, point in FAULT_POINTS]
    rng = random.Random(seed)
    # Start-up (imports, model load) takes about half the run; the timers fall in the other half.
    plan += [(f"random moment {i + 1}", None, rng.uniform(0.45, 0.95) * seconds) for i in range(timers)]
    trials = []
    for number, (label, point, delay) in enumerate(plan):
        for attempt in range(3):  # a timer that fires after the run has ended is tried again, earlier
            trial = kill_and_resume(label, config, root / f"trial-{number}-{attempt}", cache, reference,
                                    fault=point, kill_after=delay and delay * 0.6 ** attempt)
            if trial.killed or point is not None:
                break
        trials.append(trial)
        print(f"  {label:<48} {trial.how:<22} from {trial.resumed_from or '-':<13} "
              f"{'identical' if trial.identical else 'DIFFERENT'} {trial.note[:200]}", flush=True)
    return trials, config, seconds


def hostile_case(case: HostileCase, env: dict) -> dict:
    command = [sys.executable, "-m", "kwanzaa_adapter.cli", *case.argv]
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=HOSTILE_TIME_BOX_S)
    except subprocess.TimeoutExpired:
        return {"name": case.name, "hang": True, "traceback": False, "exit": None, "expected": case.expected_exit}
    output = done.stdout + done.stderr
    return {"name": case.name, "hang": False, "traceback": "Traceback" in output, "exit": done.returncode,
            "expected": case.expected_exit}


def hostile_inputs(root: Path) -> list[dict]:
    cases = build_corpus(root / "hostile")
    env = child_env(root / "cache")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda case: hostile_case(case, env), cases))


def server_flood(config: Path, artifact: Path):
    from kwanzaa_adapter.config import load_training_config
    from kwanzaa_adapter.models import model_from_config
    from kwanzaa_adapter.serving import ServeLimits, create_app
    from test_serve import running
    from tests.reliability.flood import KEY, flood, still_answers

    model = model_from_config(load_training_config(config, ("evaluation.max_new_tokens=4",)), adapter=artifact)
    with running(create_app(model, ServeLimits(), api_key=KEY)) as url:
        result = flood(url)
        alive = still_answers(url)
    return result, alive


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=3, help="trials killed at random times (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kwanzaa-reliability-") as tmp:
        root = Path(tmp)
        print("1. crash and resume", flush=True)
        trials, config, _ = crash_trials(root, args.timers, args.seed)
        print("2. hostile inputs", flush=True)
        hostile = hostile_inputs(root)
        print("3. server flood", flush=True)
        flooded, alive = server_flood(config, root / "reference" / "tiny" / "final_artifact")

    killed = [t for t in trials if t.killed]
    wrong_exit = [h for h in hostile if not h["hang"] and h["exit"] != h["expected"]]
    figures = {
        "trials": len(killed),
        "resumed": sum(t.resumed for t in killed),
        "identical": sum(t.identical for t in killed),
        "partial_visible": sum(t.partial_visible for t in trials),
        "hostile_inputs": len(hostile),
        "tracebacks": sum(h["traceback"] for h in hostile),
        "hangs": sum(h["hang"] for h in hostile),
        "server_bad_requests": flooded.sent,
        "server_errors": flooded.server_errors + sum(1 for f in flooded.failures if "no answer" in f),
        "server_alive": alive,
    }
    print()
    print("| measure | value | required |")
    print("| --- | --- | --- |")
    rows = [
        ("kill trials (SIGKILL, then resume)", figures["trials"], ">= 10"),
        ("  resumed to a published artifact", figures["resumed"], "all"),
        ("  adapter byte-identical to the uninterrupted run", figures["identical"], "all"),
        ("  partial checkpoints or artifacts left visible", figures["partial_visible"], "0"),
        ("  trials the kill did not reach", len(trials) - len(killed), "0"),
        ("hostile inputs (CLI subprocesses)", figures["hostile_inputs"], ">= 60"),
        ("  tracebacks", figures["tracebacks"], "0"),
        ("  hangs (over %d s)" % HOSTILE_TIME_BOX_S, figures["hangs"], "0"),
        ("  exits other than the expected 1 or 2", len(wrong_exit), "0"),
        ("server bad requests", figures["server_bad_requests"], ">= 200"),
        ("  answered 4xx", sum(c for s, c in flooded.statuses.items() if 400 <= s < 500), "all"),
        ("  server errors (5xx or no answer)", figures["server_errors"], "0"),
        ("  server alive afterwards (good answer)", figures["server_alive"], "true"),
    ]
    for name, value, required in rows:
        print(f"| {name} | {value} | {required} |")
    for trial in trials:
        if not (trial.killed and trial.resumed and trial.identical) or trial.partial_visible:
            print(f"trial {trial.label}: {trial.partial_after_kill + trial.partial_after_resume} {trial.note[:500]}")
    for case in wrong_exit:
        print(f"hostile {case['name']}: exit {case['exit']}, expected {case['expected']}")
    for failure in flooded.failures:
        print(f"server: {failure}")
    print(f"statuses: {dict(sorted(flooded.statuses.items()))}; total {time.monotonic() - started:.0f} s")
    print(json.dumps(figures))
    ok = (figures["trials"] >= 10 and figures["resumed"] == figures["identical"] == figures["trials"]
          and figures["partial_visible"] == 0 and figures["tracebacks"] == figures["hangs"] == 0
          and not wrong_exit and figures["server_errors"] == 0 and alive and not flooded.failures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
