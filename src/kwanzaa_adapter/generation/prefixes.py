"""Prompts that begin alike: which pre-filled sequence a prompt can start from, and the order that
puts such prompts in one batch.

Retrieval prompts share long beginnings: the system prompt, and then, for the questions asked of
the same documents, every document. The fast engine pre-fills such a beginning once and copies its
KV cache to the prompts that share it (`LlamaCppEngine._prefill_rows`); on the demo's eval split,
in batches of 24, that is 11.3k of its 24.7k prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

# Fewer shared tokens than this are computed again: copying a sequence's KV costs about as much.
MIN_SHARED_TOKENS = 16


def shared_length(first: Sequence[int], second: Sequence[int]) -> int:
    """How many tokens the two sequences have in common from the start."""
    count = 0
    for a, b in zip(first, second):
        if a != b:
            break
        count += 1
    return count


def longest_shared(prompt: Sequence[int], there: Sequence[tuple[Sequence[int], int]]) -> tuple[int, int] | None:
    """(sequence, n): the sequence among `there` ((prompt, sequence) pairs) whose prompt shares the most
    leading tokens with `prompt`, and how many of them to take; at least the last token is left to
    compute, for its logits. None below `MIN_SHARED_TOKENS`."""
    best, source = 0, None
    for other, sequence in there:
        length = min(shared_length(prompt, other), len(prompt) - 1)
        if length > best:
            best, source = length, sequence
    return (source, best) if best >= MIN_SHARED_TOKENS else None


def batch_order(prompts: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `prompts` in the order batches take them: families of prompts that share at least half
    of the shorter one (the same documents, another question) side by side, so that a batch pre-fills
    their beginning once; the family with the longest prompt first, so that each batch's context is
    sized for its own prompts; in a family, longest first, equal prompts side by side."""
    lexical = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    families: list[list[int]] = []
    for previous, index in zip([None, *lexical], lexical):
        if previous is not None:
            a, b = prompts[previous], prompts[index]
            if shared_length(a, b) * 2 >= min(len(a), len(b)):
                families[-1].append(index)
                continue
        families.append([index])
    families.sort(key=lambda family: (-max(len(prompts[i]) for i in family), min(family)))
    return [i for family in families for i in sorted(family, key=lambda i: (-len(prompts[i]), list(prompts[i])))]


def copied_tokens(prompts: Sequence[Sequence[int]], batch_size: int) -> int:
    """How many prompt tokens the fast engine copies instead of computing, batching `prompts` as it does
    (`batch_order`; each distinct prompt against those pre-filled before it in its batch)."""
    order, copied = batch_order(prompts), 0
    for first in range(0, len(order), batch_size):
        there: list[tuple[tuple[int, ...], int]] = []
        for index in order[first: first + batch_size]:
            prompt = tuple(prompts[index])
            if any(prompt == other for other, _ in there):
                continue
            shared = longest_shared(prompt, there)
            copied += shared[1] if shared else 0
            there.append((prompt, len(there)))
    return copied
