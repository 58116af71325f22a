"""The fast engine's model, derived from the model as trained: de-quantized 4-bit base + LoRA delta -> GGUF.

`merged_state` reads a loaded (Peft)model without touching it: each 4-bit weight de-quantized as
training's forward pass de-quantizes it (bitsandbytes, to float32), plus, with the adapter, PEFT's
own `get_delta_weight` of every active LoRA; every other parameter in float32. `write_merged`
saves that as a plain Transformers model directory, and `convert_to_gguf` runs llama.cpp's own
`convert_hf_to_gguf.py`, from the same source tree as the engine, on it.

`derived_gguf` caches the result under a key made of everything it derives from: the base model's digest
(checked by the caller: training's baseline, or the backend's digest check against the verified
artifact) and its configuration, a digest of the LoRA tensors as loaded and of the adapters' settings
(rank, alpha, rsLoRA, targets), the weight type, the merged weights' dtype, and the converter's version
and source tree. Each cached file sits beside `derived.json`, which records those sources and the file's
sha256; both are checked before every use, and an entry that does not match is rebuilt. That guards
against accidents only (whoever can write the cache can rewrite both): the engine proves a derived model
is the verified one by its logits before it answers (`generation.logit_check`). An entry is built in a
folder of its own and renamed into place whole; of two processes that build one entry at once, the one
that loses the race uses the winner's.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

from kwanzaa_adapter.safety.artifacts import sha256_file

log = logging.getLogger(__name__)

QUANTS = ("q8_0", "bf16", "f16")
DERIVED_RECORD = "derived.json"
DERIVED_FORMAT = "kwanzaa-adapter.derived.v1"
GGUF_FILE = "model.gguf"
CONVERTER_MISSING = ("llama.cpp's converter (convert_hf_to_gguf.py) is not in this environment: `make setup` "
                     "builds llama.cpp (scripts/build_llamacpp.sh)")


class DerivationError(RuntimeError):
    """The model cannot be converted for the fast engine (architecture, converter): the reference runs."""


# --------------------------------------------------------------------------- merged weights


def _inner(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _dequantized(layer) -> torch.Tensor:
    weight = layer.weight
    if getattr(weight, "quant_state", None) is not None:
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, weight.quant_state).float().cpu()
    return weight.detach().to("cpu", torch.float32, copy=True)  # a copy: the delta is added to it in place


@torch.no_grad()
def merged_state(model, with_adapter: bool = True) -> dict[str, torch.Tensor]:
    """float32 weights of the base architecture, named as the base model names them (see module doc)."""
    from peft.tuners.lora import LoraLayer

    inner, state, inside_lora = _inner(model), {}, set()
    for name, module in inner.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoraLayer):
            inside_lora.add(name)
            base = module.get_base_layer()
            weight = _dequantized(base)
            if with_adapter and not getattr(module, "disable_adapters", False):
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        weight += module.get_delta_weight(adapter).float().cpu()
            state[f"{name}.weight"] = weight
            if getattr(base, "bias", None) is not None:
                state[f"{name}.bias"] = base.bias.detach().float().cpu()
            continue
        for key, parameter in module.named_parameters(recurse=False):
            state[f"{name}.{key}" if name else key] = (
                _dequantized(module) if key == "weight" else parameter.detach().to("cpu", torch.float32, copy=True))
    return state


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=_plain).encode()).hexdigest()


def _plain(value):
    """JSON for what json cannot write: a set as a sorted list (its order is not the same in every process)."""
    return sorted(value, key=str) if isinstance(value, (set, frozenset)) else str(value)


def adapter_settings_digest(model) -> str | None:
    """sha256 of every adapter's settings as loaded (`adapter_config.json`: rank, alpha, rsLoRA, targets...)."""
    configs = getattr(model, "peft_config", None)
    return _digest({name: config.to_dict() for name, config in configs.items()}) if configs else None


def base_config_digest(model) -> str:
    """sha256 of the base model's configuration (`config.json` as loaded)."""
    return _digest(_inner(model).config.to_dict())


def lora_digest(model) -> str | None:
    """sha256 of the LoRA tensors as loaded (names and float32 bytes); None without any."""
    digest, found = hashlib.sha256(), False
    for name, parameter in sorted(_inner(model).named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            found = True
            digest.update(name.encode())
            digest.update(parameter.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest() if found else None


def write_merged(model, tokenizer, directory: Path, with_adapter: bool = True) -> Path:
    """The merged float32 weights as a plain Transformers model directory, with the tokenizer."""
    from transformers import AutoModelForCausalLM

    config = _inner(model).config.__class__.from_dict(_inner(model).config.to_dict())
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.use_cache, config.dtype = True, torch.float32
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = merged_state(model, with_adapter)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise DerivationError(f"the merged weights do not fit {type(plain).__name__}: missing "
                              f"{sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}")
    if tied:
        plain.tie_weights()
    plain.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- GGUF


def llamacpp_source() -> Path:
    """The llama.cpp tree the engine was built from (KWANZAA_LLAMACPP_SRC, or the environment's build)."""
    given = os.environ.get("KWANZAA_LLAMACPP_SRC")
    candidates = [Path(given)] if given else sorted(Path(sys.prefix, "llama.cpp").glob("llama_cpp_python-*/vendor/llama.cpp"))
    for candidate in candidates:
        if (candidate / "convert_hf_to_gguf.py").is_file():
            return candidate
    raise DerivationError(CONVERTER_MISSING)


def converter_version() -> str:
    try:
        return f"llama-cpp-python {metadata.version('llama_cpp_python')}"
    except metadata.PackageNotFoundError:
        raise DerivationError(CONVERTER_MISSING) from None


@functools.lru_cache(maxsize=4)
def _tree_digest(source: Path) -> str:
    digest = hashlib.sha256()
    for path in [source / "convert_hf_to_gguf.py", *sorted((source / "gguf-py").rglob("*.py"))]:
        digest.update(str(path.relative_to(source)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def converter_digest() -> str:
    """sha256 of the converter's source: convert_hf_to_gguf.py and the gguf-py package it writes with."""
    return _tree_digest(llamacpp_source())


def convert_to_gguf(model_dir: Path, out: Path, quant: str) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on a Transformers model directory; DerivationError with its
    last lines when it fails (an architecture it does not know, a tokenizer it cannot read)."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    source = llamacpp_source()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(source / "gguf-py"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(source / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                           "--outtype", quant], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise DerivationError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
    return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("KWANZAA_ADAPTER_CACHE") or Path.home() / ".cache" / "kwanzaa-adapter") / "derived"


def derived_gguf(model, tokenizer, *, base_digest: str, with_adapter: bool, quant: str,
                 cache_dir: str | Path | None = None, rebuild: str | None = None) -> tuple[Path, dict]:
    """(GGUF path, its record): from the cache when its record and sha256 match, else built anew; `rebuild`
    (the reason) builds anew in any case. DerivationError when it cannot be built (a cache that cannot be
    written included)."""
    cache = Path(cache_dir or default_cache_dir())
    try:
        sources = {"format": DERIVED_FORMAT, "base_digest": base_digest, "base_config": base_config_digest(model),
                   "adapter_digest": lora_digest(model) if with_adapter else None,
                   "adapter_settings": adapter_settings_digest(model) if with_adapter else None,
                   "quant": quant, "merged_dtype": "float32", "converter": converter_version(),
                   "converter_source": converter_digest()}
        entry = cache / _digest(sources)[:24]
        problem = rebuild or check_derived(entry, sources)
        if problem is None:
            log.info("fast engine: cached %s (%s)", entry / GGUF_FILE, quant)
            return entry / GGUF_FILE, json.loads((entry / DERIVED_RECORD).read_text())
        if entry.exists():
            log.warning("fast engine: rebuilding %s: %s", entry, problem)
        return build_derived(model, tokenizer, entry, sources, with_adapter)
    except OSError as exc:
        raise DerivationError(f"cannot derive the fast engine's model in {cache}: {exc}") from None


def check_derived(entry: Path, sources: dict) -> str | None:
    """Why a cache entry may not be used (None: it may)."""
    record_path, gguf = entry / DERIVED_RECORD, entry / GGUF_FILE
    if not record_path.is_file() or not gguf.is_file():
        return "no cached model"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {DERIVED_RECORD} ({exc})"
    if record.get("derives_from") != sources:
        return f"it derives from {record.get('derives_from')}, not {sources}"
    if sha256_file(gguf)[0] != record.get("gguf_sha256"):
        return f"{GGUF_FILE} does not have the sha256 its record holds"
    return None


def build_derived(model, tokenizer, entry: Path, sources: dict, with_adapter: bool) -> tuple[Path, dict]:
    """Build the entry in a folder of its own beside it, then rename that folder into place whole: an old
    entry is first renamed aside (and removed); a process that built the same entry meanwhile wins, and its
    entry is used when it checks out."""
    started = time.perf_counter()
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=".building-"))
    try:
        write_merged(model, tokenizer, staging / "merged", with_adapter)
        gguf = convert_to_gguf(staging / "merged", staging / GGUF_FILE, sources["quant"])
        shutil.rmtree(staging / "merged")
        record = {"derives_from": sources, "gguf_sha256": sha256_file(gguf)[0],
                  "built_seconds": round(time.perf_counter() - started, 1)}
        (staging / DERIVED_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        if entry.exists():
            with contextlib.suppress(OSError):  # another process may have moved it already
                entry.rename(aside := Path(tempfile.mkdtemp(dir=entry.parent, prefix=".stale-")) / "entry")
                shutil.rmtree(aside.parent, ignore_errors=True)
        try:
            staging.rename(entry)
        except OSError:  # another process renamed its entry into place first: use the winner's
            if check_derived(entry, sources) is not None:
                raise
            log.info("fast engine: %s was built by another process meanwhile", entry)
            return entry / GGUF_FILE, json.loads((entry / DERIVED_RECORD).read_text())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("fast engine: built %s (%s) in %.1f s", entry / GGUF_FILE, sources["quant"], record["built_seconds"])
    return entry / GGUF_FILE, record
