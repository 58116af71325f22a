"""Reliability figures: kill-and-resume trials, the hostile-input corpus, and a server flood.

    python bench/reliability.py                 # everything (~12 minutes on 2 busy CPU cores)
    python bench/reliability.py --timers 0      # only the fault-hook kills, no timer kills

1. Crash and resume, on a tiny random 2-layer Llama (4-bit, LoRA dropout 0.1, batch 2 x
   accumulation 2, 6 steps over 2 epochs, checkpoints every 2 steps, 2 kept): one uninterrupted
   run, watched to time its training-and-checkpointing window (from the Trainer's start to the
   last checkpoint's publication), then one trial per fault point of tests/reliability/crash.py
   (mid-step, inside the accumulation window, during checkpoint saves and rotation, during
   artifact creation and the final verification) and `--timers` trials killed at seeded random
   moments of that window, each timed from the killed run's own last milestone before it (the
   Trainer's start or a checkpoint's publication), so that a faster or slower run is still killed
   in training rather than after its artifact was published. Each trial is a
   `train` subprocess killed with SIGKILL, a look for partial checkpoints or artifacts, a
   `train --resume` (or a fresh `train` when no checkpoint was complete), a check that the resumed
   process loaded the checkpoint's step, optimizer moments and RNG state, and a byte comparison
   of adapter_model.safetensors with the uninterrupted run's. Trials are counted by what
   happened: `resumed` (from a checkpoint, proven loaded), `restarted_from_scratch` (killed
   before the first checkpoint), `killed_after_publish` (nothing left to resume).
2. The hostile-input corpus (tests/reliability/corpus.py), one CLI subprocess per case,
   time-boxed: tracebacks, hangs, exits other than the expected 1 or 2, and refusals whose
   message does not give the case's reason.
3. The server (API key, default limits) over the uninterrupted run's artifact, flooded with the
   bad requests of tests/reliability/flood.py (authenticated and unauthenticated counted apart),
   then with distinct JSON Schemas of the largest size it accepts, all at once, while /healthz is
   timed (`schema_flood_healthz_max_s`, required under 1 s), then asked a good question.
4. The attacks on a signed artifact of tests/reliability/signatures.py (weights replaced and
   checksums recomputed, a signature copied from another artifact, an untrusted key, a file added,
   a symlink, a truncated, garbage or removed signature, an altered statement), each through
   `verify --public-key` and `generate --trusted-key` in subprocesses: caught when both exit 1 with
   the attack's reason, no traceback and no weights loaded. Then the attack a key beside the artifact
   invites (tests/reliability/signatures.py, `build_anchor_cases`): the forger's public key, in the run
   directory or the artifact, or copied out of there, offered as the trust anchor: refused with exit 2.

5. The fast engine's trust (tests/reliability/engine_trust.py): the base's GGUF swapped into the adapter's
   cache entry with its record rewritten (refused under `llama.cpp`, rebuilt under `auto`), an adapter
   with another `lora_alpha` and the same tensors (never given the first one's entry), rows of a
   continuous batch failing for another row's sake, and a gate swapped or removed while the adapter
   loads. `--engine-only` runs this section alone (about a minute).

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

from tests.reliability.corpus import HostileCase, build_corpus  # noqa: E402
from tests.reliability.crash import (  # noqa: E402
    FAULT_POINTS,
    KILL_RUN,
    Trial,
    child_env,
    kill_and_resume,
    reference_run,
)
from tests.reliability.signatures import attack_name, build_anchor_cases, build_signature_attacks  # noqa: E402

from conftest import build_tiny_model, packaged_gguf_path, write_run_config  # noqa: E402

DEFAULT_TIMERS = 5  # with the 9 fault points that resume from a checkpoint: >= 10 real resumes
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
    reference = reference_run(config, root / "reference", cache)
    milestones = reference.milestones()
    print(f"uninterrupted run: {reference.seconds:.1f} s; training and checkpointing, in seconds from the "
          f"Trainer's start: {', '.join(f'{name} {seconds:.2f}' for name, seconds in milestones)}", flush=True)
    plan = [(label, point, None) for label, point in FAULT_POINTS]
    rng = random.Random(seed)
    plan += [(f"random moment {i + 1}", None, rng.uniform(0, milestones[-1][1])) for i in range(timers)]
    trials = []
    for number, (label, point, at) in enumerate(plan):
        for attempt in range(3):  # a timer that fires after the run has ended is tried again, earlier
            trial = kill_and_resume(label, config, root / f"trial-{number}-{attempt}", cache, reference.weights,
                                    fault=point, timer=None if at is None else reference.moment(at * 0.6 ** attempt))
            if trial.killed or point is not None:
                break
        trials.append(trial)
        print(f"  {label:<48} {trial.how:<38} from {trial.resumed_from or '-':<13} "
              f"{'identical' if trial.identical else 'DIFFERENT'} "
              f"{'; '.join(trial.resume_problems)[:300]} {trial.note[:200]}", flush=True)
    return trials, config, reference.seconds


def hostile_case(case: HostileCase, env: dict) -> dict:
    command = [sys.executable, "-m", "kwanzaa_adapter.cli", *case.argv]
    try:
        done = subprocess.run(command, env=env, cwd=ROOT, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=HOSTILE_TIME_BOX_S)
    except subprocess.TimeoutExpired:
        return {"name": case.name, "hang": True, "traceback": False, "exit": None, "expected": case.expected_exit,
                "reason_given": False, "output": ""}
    output = done.stdout + done.stderr
    return {"name": case.name, "hang": False, "traceback": "Traceback" in output, "exit": done.returncode,
            "expected": case.expected_exit, "reason_given": case.gives_reason(output), "output": output,
            "loaded_weights": "Loading weights" in output}


def run_cases(cases: list[HostileCase], root: Path) -> list[dict]:
    env = child_env(root / "cache")
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda case: hostile_case(case, env), cases))


def signature_attacks(root: Path) -> tuple[int, int, list[dict]]:
    """(attacks, attacks caught through every command, the cases that were not)."""
    (root / "signatures").mkdir()
    cases = build_signature_attacks(root / "signatures")
    results = run_cases(cases, root)
    missed = [r for r in results if r["hang"] or r["traceback"] or r["exit"] != 1 or not r["reason_given"]
              or r["loaded_weights"]]
    attacks = {attack_name(case) for case in cases}
    return len(attacks), len(attacks - {attack_name(HostileCase(r["name"], "", (), "")) for r in missed}), missed


def anchor_cases(root: Path) -> tuple[int, list[dict]]:
    """(cases, the ones not refused for their reason): a key from the artifact or its run directory offered
    as the trust anchor, by its path or as a copy, through `verify` and `generate` (exit 2, nothing loaded)."""
    (root / "anchors").mkdir()
    cases = build_anchor_cases(root / "anchors")
    results = run_cases(cases, root)
    return len(cases), [r for r in results if r["hang"] or r["traceback"] or r["exit"] != 2 or not r["reason_given"]
                        or r["loaded_weights"]]


def server_flood(config: Path, artifact: Path):
    from helpers import running
    from tests.reliability.flood import KEY, flood, schema_flood, still_answers

    from kwanzaa_adapter.backend.models import model_from_config
    from kwanzaa_adapter.backend.serving.schemas import ServeLimits
    from kwanzaa_adapter.backend.serving.server import create_app
    from kwanzaa_adapter.config import load_training_config

    model = model_from_config(load_training_config(config, ("evaluation.max_new_tokens=4",)), adapter=artifact)
    with running(create_app(model, ServeLimits(), api_key=KEY)) as url:
        result = flood(url)
        schemas = schema_flood(url)
        alive = still_answers(url)
    return result, schemas, alive


def engine_trust(root: Path) -> dict[str, int]:
    from tests.reliability.engine_trust import batch_failures_from_one_row, derived_cases, gate_swap_refused

    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(root / "engine-model")
    return {**derived_cases(root, model), "batch_failures_from_one_row": batch_failures_from_one_row(root),
            "gate_swap_refused": gate_swap_refused(root, model)}


def engine_trust_ok(figures: dict) -> bool:
    return (figures["derived_swap_refused"] == 2 and figures["stale_derived_reused"] == 0
            and figures["batch_failures_from_one_row"] == 0 and figures["gate_swap_refused"] == 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=DEFAULT_TIMERS,
                        help=f"trials killed at random moments of training (default {DEFAULT_TIMERS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--engine-only", action="store_true", help="only section 5, the fast engine's trust")
    args = parser.parse_args()
    started = time.monotonic()
    if args.engine_only:
        with tempfile.TemporaryDirectory(prefix="kwanzaa-reliability-") as tmp:
            figures = engine_trust(Path(tmp))
        print(json.dumps(figures))
        return 0 if engine_trust_ok(figures) else 1
    with tempfile.TemporaryDirectory(prefix="kwanzaa-reliability-") as tmp:
        root = Path(tmp)
        print("1. crash and resume", flush=True)
        trials, config, _ = crash_trials(root, args.timers, args.seed)
        print("2. hostile inputs", flush=True)
        hostile = run_cases(build_corpus(root / "hostile"), root)
        print("3. server flood", flush=True)
        flooded, schemas, alive = server_flood(config, root / "reference" / "tiny" / "final_artifact")
        print("4. signature attacks", flush=True)
        attacks, caught, missed = signature_attacks(root)
        anchors, anchors_missed = anchor_cases(root)
        print("5. the fast engine's trust", flush=True)
        engine = engine_trust(root / "engine")

    killed = [t for t in trials if t.killed]
    resumed, restarted, after_publish, unresolved = (
        [t for t in killed if t.outcome == outcome] for outcome in ("resumed", "restarted", "after_publish", "failed"))
    wrong_exit = [h for h in hostile if not h["hang"] and h["exit"] != h["expected"]]
    wrong_reason = [h for h in hostile if not h["hang"] and h["exit"] == h["expected"] and not h["reason_given"]]
    figures = {
        "trials": len(killed),
        "resumed": len(resumed),
        "identical": sum(t.identical for t in resumed),
        "restarted_from_scratch": len(restarted),
        "restarted_identical": sum(t.identical for t in restarted),
        "killed_after_publish": len(after_publish),
        "after_publish_identical": sum(t.identical for t in after_publish),
        "resume_failed_or_unproven": len(unresolved),
        "not_killed": len(trials) - len(killed),
        "partial_visible": sum(t.partial_visible for t in trials),
        "hostile_inputs": len(hostile),
        "tracebacks": sum(h["traceback"] for h in hostile),
        "hangs": sum(h["hang"] for h in hostile),
        "hostile_wrong_exit": len(wrong_exit),
        "hostile_wrong_reason": len(wrong_reason),
        "server_bad_requests": flooded.sent(),
        "server_bad_requests_authenticated": flooded.sent("authenticated"),
        "server_bad_requests_unauthenticated": flooded.sent("unauthenticated"),
        "server_errors": flooded.server_errors + sum(1 for f in flooded.failures if "no answer" in f),
        "server_alive": alive,
        "schema_flood_healthz_max_s": round(schemas.healthz_max_s, 3),
        "signature_attacks": attacks,
        "signature_caught": caught,
        "key_inside_artifact_cases": anchors,
        "key_inside_artifact_refused": anchors > 0 and not anchors_missed,
        **engine,
    }
    authenticated, unauthenticated = flooded.statuses["authenticated"], flooded.statuses["unauthenticated"]
    print()
    print("| measure | value | required |")
    print("| --- | --- | --- |")
    rows = [
        ("kill trials (SIGKILL)", figures["trials"], ""),
        ("  resumed from a checkpoint, loading its step, optimizer and RNG", figures["resumed"], ">= 10"),
        ("    adapter byte-identical to the uninterrupted run", figures["identical"], "all resumed"),
        ("  killed before the first checkpoint, trained again", figures["restarted_from_scratch"], ""),
        ("    adapter byte-identical", figures["restarted_identical"], "all restarted"),
        ("  killed after the artifact was published (nothing resumed)", figures["killed_after_publish"], ""),
        ("  resume failed, or did not load what the checkpoint holds", figures["resume_failed_or_unproven"], "0"),
        ("  partial checkpoints or artifacts left visible", figures["partial_visible"], "0"),
        ("  trials the kill did not reach", figures["not_killed"], "0"),
        ("hostile inputs (CLI subprocesses)", figures["hostile_inputs"], ">= 60"),
        ("  tracebacks", figures["tracebacks"], "0"),
        ("  hangs (over %d s)" % HOSTILE_TIME_BOX_S, figures["hangs"], "0"),
        ("  exits other than the expected 1 or 2", figures["hostile_wrong_exit"], "0"),
        ("  refused, but not for the case's reason", figures["hostile_wrong_reason"], "0"),
        ("server bad requests with the right key", figures["server_bad_requests_authenticated"], ">= 200"),
        ("  answered 4xx other than 401", sum(c for s, c in authenticated.items() if 400 <= s < 500 and s != 401),
         "all"),
        ("server bad requests without it (or a wrong one)", figures["server_bad_requests_unauthenticated"], ""),
        ("  answered 401 (405: /healthz, open, wrong method)", unauthenticated[401], "all but /healthz"),
        ("server errors (5xx or no answer)", figures["server_errors"], "0"),
        ("server alive afterwards (good answer)", figures["server_alive"], "true"),
        (f"slowest /healthz during a flood of {sum(schemas.statuses.values())} JSON Schemas, s "
         f"(statuses {dict(sorted(schemas.statuses.items()))})", figures["schema_flood_healthz_max_s"], "< 1"),
        ("attacks on a signed artifact (verify and generate each)", attacks, ">= 7"),
        ("  refused with exit 1 and the attack's reason, nothing loaded", caught, "all"),
        ("a key from the artifact or its run directory as trust anchor", anchors, ">= 6"),
        ("  refused with exit 2 and why, nothing loaded", anchors - len(anchors_missed), "all"),
        ("derived GGUF swapped for the base's, record rewritten: refused / rebuilt", figures["derived_swap_refused"],
         "2"),
        ("cached GGUF reused for the same tensors with another lora_alpha", figures["stale_derived_reused"], "0"),
        ("batch rows failed by another row (parted rows after joins, a failing sampler)",
         figures["batch_failures_from_one_row"], "0"),
        ("gate swapped or removed while the adapter loads: refused", figures["gate_swap_refused"], "2"),
    ]
    for name, value, required in rows:
        print(f"| {name} | {value} | {required} |")
    for trial in trials:
        if not (trial.killed and trial.completed and trial.identical) or trial.resume_problems or trial.partial_visible:
            print(f"trial {trial.label}: {trial.partial_after_kill + trial.partial_after_resume} "
                  f"{trial.resume_problems} {trial.note[:500]}")
    for case in wrong_exit:
        print(f"hostile {case['name']}: exit {case['exit']}, expected {case['expected']}")
    for case in wrong_reason:
        print(f"hostile {case['name']}: refused, but not for its reason: {case['output'][-300:]!r}")
    for case in missed + anchors_missed:
        print(f"signature {case['name']}: exit {case['exit']}, {case['output'][-300:]!r}")
    for failure in flooded.failures:
        print(f"server: {failure}")
    print(f"statuses with the key: {dict(sorted(authenticated.items()))}, without: "
          f"{dict(sorted(unauthenticated.items()))}; total {time.monotonic() - started:.0f} s")
    print(json.dumps(figures))
    ok = (figures["resumed"] >= 10 and figures["identical"] == figures["resumed"]
          and figures["restarted_identical"] == figures["restarted_from_scratch"]
          and figures["after_publish_identical"] == figures["killed_after_publish"]
          and figures["resume_failed_or_unproven"] == figures["not_killed"] == figures["partial_visible"] == 0
          and figures["tracebacks"] == figures["hangs"] == 0 and not wrong_exit and not wrong_reason
          and figures["server_bad_requests_authenticated"] >= 200 and figures["server_errors"] == 0
          and alive and not flooded.failures and caught == attacks >= 7 and schemas.healthz_max_s < 1
          and set(schemas.statuses) <= {200, 429} and figures["key_inside_artifact_refused"]
          and engine_trust_ok(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
