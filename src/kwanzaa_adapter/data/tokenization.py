"""Conversations of a data file -> tokenized examples (`chat_template` labels each one), and an on-disk cache.

The cache records a SHA-256 of its content when written and is reused only when it still matches;
a cache file that does not match or cannot be read is rebuilt, with a warning naming it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT
from kwanzaa_adapter.data.chat_template import TemplateError, TokenizedExample, tokenize_conversation
from kwanzaa_adapter.data.validation import Conversation, DataError, Issue, load_examples

CACHE_FORMAT = "kwanzaa.tokenized.v2"  # bump when the labelling rules or the file layout change
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizationReport:
    rows: int
    truncated: int
    supervised_tokens: int
    total_tokens: int
    max_seq_length: int | None


def tokenize_dataset(
    examples: Sequence[Conversation], tokenizer, max_seq_length: int
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenize every conversation; raises `DataError` naming each one left with nothing to learn."""
    tokenized, issues = [], []
    for conversation in examples:
        try:
            example = tokenize_conversation(conversation.messages, tokenizer, max_seq_length)
        except TemplateError as exc:
            issues.append(Issue(conversation.path, conversation.line, "template", str(exc)))
            continue
        if example.supervised_tokens == 0:
            reason = f"after truncation to max_seq_length {max_seq_length}" if example.truncated else "at all"
            issues.append(Issue(conversation.path, conversation.line, "no_supervised_tokens",
                                f"{_label(conversation)}has no assistant token {reason}; shorten the prompt or "
                                "raise max_seq_length"))
            continue
        tokenized.append(example)
    if issues:
        raise DataError(issues)
    return tokenized, _report(tokenized, max_seq_length)


def _label(conversation: Conversation) -> str:
    return f"example id {conversation.id!r} " if conversation.id else "example "


def _report(examples: Sequence[TokenizedExample], max_seq_length: int | None) -> TokenizationReport:
    return TokenizationReport(
        rows=len(examples),
        truncated=sum(e.truncated for e in examples),
        supervised_tokens=sum(e.supervised_tokens for e in examples),
        total_tokens=sum(len(e.input_ids) for e in examples),
        max_seq_length=max_seq_length,
    )


def tokenizer_digest(tokenizer) -> str:
    """sha256 of what decides token ids: the full tokenizer definition, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    identity = {
        "definition": hashlib.sha256(definition.encode()).hexdigest(),
        "chat_template": tokenizer.chat_template,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cache_key(data_path: Path, tokenizer, max_seq_length: int, system_prompt: str) -> str:
    material = {
        "format": CACHE_FORMAT,
        "data_sha256": hashlib.sha256(Path(data_path).read_bytes()).hexdigest(),
        "tokenizer": tokenizer_digest(tokenizer),
        "max_seq_length": max_seq_length,
        "system_prompt": system_prompt,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def tokenize_file(
    data_path: str | Path,
    tokenizer,
    max_seq_length: int,
    *,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    cache_dir: str | Path | None = None,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Load, validate and tokenize a data file, reusing `cache_dir/<key>.safetensors` when present."""
    cache_file = None
    if cache_dir is not None:
        key = cache_key(Path(data_path), tokenizer, max_seq_length, system_prompt)
        cache_file = Path(cache_dir) / f"{key}.safetensors"
        cached = read_cache(cache_file)
        if cached is not None:
            log.info("tokenized %s from cache %s (digest verified)", data_path, cache_file)
            return cached
    examples = load_examples(data_path, system_prompt)
    tokenized, report = tokenize_dataset(examples, tokenizer, max_seq_length)
    if cache_file is not None:
        write_cache(cache_file, tokenized, report)
    return tokenized, report


def write_cache(path: Path, examples: Sequence[TokenizedExample], report: TokenizationReport) -> None:
    """Concatenated ids and labels plus per-example lengths, as safetensors (never pickle), with the
    digest of that content in the metadata; atomic."""
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int64),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int64),
        "lengths": torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64),
        "truncated": torch.tensor([e.truncated for e in examples], dtype=torch.bool),
    }
    metadata = {"format": CACHE_FORMAT, "report": json.dumps(asdict(report))}
    metadata["sha256"] = cache_digest(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def cache_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 of a cache's content: its metadata (but the digest) and each tensor's name, dtype, shape, bytes."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def read_cache(path: Path) -> tuple[list[TokenizedExample], TokenizationReport] | None:
    """The cached dataset, or None when absent, unreadable or not matching its digest (it is then rebuilt)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        log.warning("rebuilding the tokenization cache %s: it cannot be read (%s)", path, exc)
        return None
    recorded, actual = metadata.get("sha256"), cache_digest(tensors, metadata)
    if metadata.get("format") != CACHE_FORMAT or recorded != actual:
        log.warning("rebuilding the tokenization cache %s: its content does not match the digest recorded when "
                    "it was written (format %s, recorded sha256 %s, content sha256 %s)",
                    path, metadata.get("format"), recorded, actual)
        return None
    try:
        report = TokenizationReport(**json.loads(metadata["report"]))
        lengths = tensors["lengths"].tolist()
        ids = tensors["input_ids"].split(lengths)
        labels = tensors["labels"].split(lengths)
        flags = tensors["truncated"].tolist()
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # a digest-matching file from a faulty writer
        log.warning("rebuilding the tokenization cache %s: it is inconsistent (%s)", path, exc)
        return None
    examples = [TokenizedExample(i.tolist(), lab.tolist(), f) for i, lab, f in zip(ids, labels, flags)]
    if len(examples) != report.rows:
        log.warning("rebuilding the tokenization cache %s: it holds %d rows, its report %d", path, len(examples),
                    report.rows)
        return None
    return examples, report
