"""Which engine generates: llama.cpp on a derived GGUF, or the reference (Transformers on the model as trained).

`inference.engine` chooses: `llama.cpp` requires it (an error when it cannot run), `reference` never
uses it, and `auto` uses it where it is built and converts the model, and otherwise says why in the
log and runs the reference. The fast model derives from the very model object the reference path
runs, after its caller checked it: the backend verifies the artifact (checksums, signature with
trusted keys, base digest) before it loads anything; training derives from the model it has just
trained, whose base it checks against the baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kwanzaa_adapter.config import KwanzaaConfig
from kwanzaa_adapter.generation.llamacpp import EngineUnavailable, LlamaCppEngine
from kwanzaa_adapter.modeling.derived import DerivationError, derived_gguf

log = logging.getLogger(__name__)
REFERENCE = "reference"


@dataclass
class EngineChoice:
    """The engine a run uses (None: the reference), its name, and why the reference runs if it does."""

    engine: LlamaCppEngine | None
    name: str
    reason: str | None = None
    record: dict | None = None  # the derived model's record (sources, sha256), fast path only

    def describe(self) -> dict:
        return {"engine": self.name, **({"fallback_reason": self.reason} if self.reason else {}),
                **({"derived": self.record} if self.record else {})}


def choose_engine(config: KwanzaaConfig, model, tokenizer, *, base_digest: str | None, with_adapter: bool,
                  gate_layer: int | None = None) -> EngineChoice:
    """The fast engine for `model` (with or without its adapter) per `inference.engine`, or the reference."""
    settings = config.inference
    if settings.engine == REFERENCE:
        return EngineChoice(None, REFERENCE)
    try:
        if base_digest is None:
            raise DerivationError("no checked base digest to derive from")
        path, record = derived_gguf(model, tokenizer, base_digest=base_digest, with_adapter=with_adapter,
                                    quant=settings.quant, cache_dir=settings.cache_dir)
        engine = LlamaCppEngine(path, threads=settings.threads, gate_layer=gate_layer)
    except (EngineUnavailable, DerivationError) as exc:
        if settings.engine != "auto":
            raise
        log.warning("fast engine unavailable, generating with the reference path: %s", exc)
        return EngineChoice(None, REFERENCE, str(exc))
    name = f"{engine.name} ({settings.quant})"
    log.info("generating with %s on %s", name, path)
    return EngineChoice(engine, name, record=record)
