"""Which engine generates: llama.cpp on a derived GGUF, or the reference (Transformers on the model as trained).

`inference.engine` chooses: `llama.cpp` requires it (an error when it cannot run), `reference` never
uses it, and `auto` uses it where it is built and converts the model, and otherwise says why in the
log and runs the reference. The fast model derives from the very model object the reference path
runs, after its caller checked it: the backend verifies the artifact (checksums, signature with
trusted keys, base digest) before it loads anything; training derives from the model it has just
trained, whose base it checks against the baseline. Before a derived model answers for the first time in
a process, its logits on two probe prompts must match that model's (`logit_check`): a cached file that
was swapped or went stale is rebuilt under `auto` and refused under `llama.cpp`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.generation.llamacpp import LlamaCppEngine
from kwanzaa_adapter.generation.llamacpp_api import EngineUnavailable
from kwanzaa_adapter.generation.logit_check import check_engine
from kwanzaa_adapter.modeling.derived import DerivationError, derived_gguf
from kwanzaa_adapter.modeling.precision import machine_identity

log = logging.getLogger(__name__)
REFERENCE = "reference"


def resolve_quant(setting: str) -> str:
    """`inference.quant`: auto is bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX: llama.cpp
    pre-fills a BF16 GGUF 1.5x faster than a Q8_0 one there, 1,485 against 1,003 tokens/s on the demo's
    eval prompts), else f16. On the AVX2 class, against the reference with the gate on (bench/inference.py,
    the demo adapter, records whose verdict differs, per rate): f16 at most 1 record on the eval split and
    1 on the second set, every decision the same; Q8_0 7 and 7, decisions 97.6% and 96.6% the same, and
    slower here (121 and 125 s against 93 and 92 s) (bench/NOTES.md)."""
    if setting != "auto":
        return setting
    machine = machine_identity("cpu")  # under bench/as_avx2.sh the capability reads AVX2: f16, as there
    native = {"avx512_bf16", "amx_bf16"} & set(machine.get("flags", []))
    return "bf16" if native and str(machine.get("capability", "")).startswith("AVX512") else "f16"


@dataclass
class EngineChoice:
    """The engine a run uses: `llamacpp`, the fast engine (None: the reference); its name; why the reference runs
    if it does."""

    llamacpp: LlamaCppEngine | None
    name: str
    reason: str | None = None
    record: dict | None = None  # the derived model's record (sources, sha256), fast path only

    def describe(self) -> dict:
        return {"engine": self.name, **({"fallback_reason": self.reason} if self.reason else {}),
                **({"derived": self.record} if self.record else {})}


def choose_engine(config: KwanzaaConfig, model, tokenizer, *, base_digest: str | None, with_adapter: bool,
                  gate_layer: int | None = None, derived: tuple | Exception | None = None) -> EngineChoice:
    """The fast engine for `model` (with or without its adapter) per `inference.engine`, or the reference.
    `derived`: what `derived_gguf` already gave for this variant ((path, record), or the error it raised)."""
    settings = config.inference
    if settings.engine == REFERENCE:
        return EngineChoice(None, REFERENCE)
    device = next(model.parameters()).device.type
    if settings.engine == "auto" and device != "cpu":
        return EngineChoice(None, REFERENCE, f"the model runs on {device}; the llama.cpp build is CPU-only")
    quant = resolve_quant(settings.quant)
    try:
        if base_digest is None:
            raise DerivationError("no checked base digest to derive from")
        if isinstance(derived, Exception):
            raise derived
        options = dict(base_digest=base_digest, with_adapter=with_adapter, quant=quant, cache_dir=settings.cache_dir)
        path, record = derived or derived_gguf(model, tokenizer, **options)
        engine, record = _checked_engine(config, model, tokenizer, path, record, options, gate_layer)
    except (EngineUnavailable, DerivationError) as exc:
        if settings.engine != "auto":
            raise
        log.warning("fast engine unavailable, generating with the reference path: %s", exc)
        return EngineChoice(None, REFERENCE, str(exc))
    name = f"{engine.name} ({quant})"
    log.info("generating with %s on %s", name, path)
    return EngineChoice(engine, name, record=record)


def _checked_engine(config: KwanzaaConfig, model, tokenizer, path, record: dict, options: dict,
                    gate_layer: int | None) -> tuple[LlamaCppEngine, dict]:
    """The derived model loaded and proven to be `model` by its logits (`logit_check`), with the check in its
    record; one that is not is rebuilt once (a warning says why) under `auto`, and is an error otherwise."""
    settings = config.inference

    def load(path) -> tuple[LlamaCppEngine, dict, str | None]:
        started = time.perf_counter()
        engine = LlamaCppEngine(path, threads=settings.threads, gate_layer=gate_layer)
        loaded = time.perf_counter()
        check = check_engine(engine, model, tokenizer, with_adapter=options["with_adapter"], quant=options["quant"])
        if not check.passed:
            engine.close()
        outcome = {**check.as_json(), "seconds": round(time.perf_counter() - loaded, 3),
                   "load_seconds": round(loaded - started, 3)}
        return engine, outcome, None if check.passed else f"{path} is not the verified model: {check.summary()}"

    engine, outcome, problem = load(path)
    if problem is not None and settings.engine == "auto":
        log.warning("fast engine: %s; rebuilding it", problem)
        path, record = derived_gguf(model, tokenizer, rebuild=problem, **options)
        engine, outcome, problem = load(path)
    if problem is not None:
        raise DerivationError(problem)
    return engine, {**record, "logit_check": outcome}


def choose_engines(config: KwanzaaConfig, model, tokenizer, *, base_digest: str | None,
                   wanted: dict[str, tuple[bool, int | None]]) -> dict[str, EngineChoice]:
    """`choose_engine` for several variants of one model ({label: (with_adapter, gate_layer)}); the
    derived models that must be built are built side by side (each conversion is a process of its own),
    and each is checked once: its result is handed to `choose_engine`, not looked up again."""
    derived = {}
    if config.inference.engine != REFERENCE and base_digest is not None and len(wanted) > 1:
        quant = resolve_quant(config.inference.quant)

        def derive(with_adapter: bool) -> tuple[bool, tuple | Exception]:
            try:
                return with_adapter, derived_gguf(model, tokenizer, base_digest=base_digest, with_adapter=with_adapter,
                                                  quant=quant, cache_dir=config.inference.cache_dir)
            except (EngineUnavailable, DerivationError) as exc:
                return with_adapter, exc  # choose_engine falls back or raises, as inference.engine says

        with ThreadPoolExecutor(max_workers=len(wanted)) as pool:
            derived = dict(pool.map(derive, sorted({with_adapter for with_adapter, _ in wanted.values()})))
    return {label: choose_engine(config, model, tokenizer, base_digest=base_digest, with_adapter=with_adapter,
                                 gate_layer=layer, derived=derived.get(with_adapter))
            for label, (with_adapter, layer) in wanted.items()}
