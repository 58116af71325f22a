"""Conversations -> token ids with labels on the assistant turns only, and an on-disk cache.

Assistant spans come from the tokenizer's own chat template: the tokens between
template(messages[:i], add_generation_prompt=True) and template(messages[:i+1]) are turn i.
Labels cover the turn's content through its end-of-turn token (so the model learns to stop)
and nothing after it (template whitespace). Both prefixes must be token prefixes of the full
conversation; a template for which they are not raises `TemplateError`.

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

from kwanzaa_adapter.data.records import DEFAULT_SYSTEM_PROMPT
from kwanzaa_adapter.data.validation import Conversation, DataError, Issue, load_examples

IGNORE_INDEX = -100
CACHE_FORMAT = "kwanzaa.tokenized.v2"  # bump when the labelling rules or the file layout change
log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The chat template does not render conversation prefixes as token prefixes."""


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX everywhere but the assistant turns
    truncated: bool

    @property
    def supervised_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "labels": self.labels}


@dataclass(frozen=True)
class TokenizationReport:
    rows: int
    truncated: int
    supervised_tokens: int
    total_tokens: int
    max_seq_length: int | None


def tokenize_conversation(
    messages: Sequence[dict[str, str]], tokenizer, max_seq_length: int | None, *, end_of_turn_id: int | None = None
) -> TokenizedExample:
    """Token ids and labels for one conversation; keeps the first `max_seq_length` tokens.

    `end_of_turn_id` defaults to the tokenizer's eos token (`<|im_end|>` for SmolLM2).
    """
    messages = list(messages)
    eot = tokenizer.eos_token_id if end_of_turn_id is None else end_of_turn_id
    input_ids = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(input_ids)
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = _assistant_span(tokenizer, messages, index, input_ids)
        end = _through_end_of_turn(input_ids, start, end, eot)
        labels[start:end] = input_ids[start:end]
    truncated = max_seq_length is not None and len(input_ids) > max_seq_length
    if truncated:
        input_ids, labels = input_ids[:max_seq_length], labels[:max_seq_length]
    return TokenizedExample(input_ids, labels, truncated)


def _render(tokenizer, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(encoded["input_ids"])


def _assistant_span(tokenizer, messages, index: int, input_ids: list[int]) -> tuple[int, int]:
    before = _render(tokenizer, messages[:index], add_generation_prompt=True)
    through = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
    for name, prefix in (("the prompt before", before), ("the conversation through", through)):
        if input_ids[: len(prefix)] != prefix:
            raise TemplateError(
                f"chat template is not prefix-stable: {name} messages[{index}] (assistant) does not tokenize "
                "to a prefix of the whole conversation, so assistant tokens cannot be located; use a "
                "template that renders each turn independently"
            )
    if len(through) <= len(before):
        raise TemplateError(f"chat template renders messages[{index}] (assistant) as no tokens")
    return len(before), len(through)


def _through_end_of_turn(input_ids: list[int], start: int, end: int, eot: int | None) -> int:
    """End of the supervised span: just after the turn's last end-of-turn token, if it has one."""
    for position in range(end - 1, start - 1, -1):
        if input_ids[position] == eot:
            return position + 1
    return end


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
