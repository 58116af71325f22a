"""The grounding check after generation: every answer sentence must rest on a document it cites.

A sentence is supported by a document whose content words (title and text) cover at least half of
the sentence's (the groundedness rule of the metrics). After generation each sentence of an answer's
text is scored against every document:
- supported by none: it leaves the text for `unknowns.unsupported_claims`;
- citing documents that do not support it: each such marker moves to the best supporting document not
  cited yet, or is dropped; a sentence with no marker left gets the best supporting one;
- the answer's `sources` are rebuilt from the markers that remain.
An answer with no supported sentence left becomes a refusal that keeps its claims as unsupported.
A refusal or an output outside the contract is returned as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kwanzaa_adapter.contract import CITATION_MARKER, Answer, Source, cited_numbers, parse_answer
from kwanzaa_adapter.data.words import content_words, split_sentences

_PUNCTUATION_SPACE = re.compile(r"\s+([.!?,;:])")
SUPPORT = 0.5  # share of a sentence's content words a document must hold to support it


def support(sentence: str, documents_words: Sequence[set[str]]) -> list[float]:
    """Per document, the share of the sentence's content words it holds (1.0 for a sentence without any)."""
    words = content_words(sentence)
    return [len(words & document) / len(words) if words else 1.0 for document in documents_words]


def _recite(sentence: str, shares: list[float]) -> str:
    """The sentence with each marker on a supporting document (moved or dropped), and one marker at least."""
    supporting = sorted((n for n, share in enumerate(shares, start=1) if share >= SUPPORT),
                        key=lambda n: -shares[n - 1])
    cited = cited_numbers(sentence)
    kept = [n for n in cited if 1 <= n <= len(shares) and shares[n - 1] >= SUPPORT]
    spare = [n for n in supporting if n not in kept]

    def replace(match) -> str:
        n = int(match.group(1))
        if n in kept:
            return match.group(0)
        return f"[{spare.pop(0)}]" if spare else ""

    text = _PUNCTUATION_SPACE.sub(r"\1", " ".join(CITATION_MARKER.sub(replace, sentence).split()))
    if not cited_numbers(text):
        stop = len(text.rstrip(".!?"))
        text = f"{text[:stop].rstrip()} [{supporting[0]}]{text[stop:]}"
    return text


def check_grounding(output: str, documents: Sequence) -> str:
    """The output with every sentence held to the documents that support it (see the module docstring)."""
    answer = parse_answer(output).answer
    if answer is None or answer.is_refusal:
        return output
    documents_words = [content_words(f"{doc.title} {doc.text}") for doc in documents]
    kept, unsupported = [], list(answer.unknowns.unsupported_claims)
    for sentence in split_sentences(answer.answer.text):
        shares = support(sentence, documents_words)
        if max(shares, default=0.0) < SUPPORT:
            unsupported.append(_PUNCTUATION_SPACE.sub(r"\1", " ".join(CITATION_MARKER.sub("", sentence).split())))
        else:
            kept.append(_recite(sentence, shares))
    text = " ".join(kept)
    numbers = cited_numbers(text)
    sources = [Source(citation=n, title=documents[n - 1].title, source=documents[n - 1].source,
                      year=documents[n - 1].year, url=documents[n - 1].url) for n in numbers]
    body = {"text": text}
    if not kept:
        body = {"text": "The documents do not support the answer that was written.", "completeness": "insufficient_data"}
    unknowns = answer.unknowns.model_copy(update={"unsupported_claims": unsupported})
    held = answer.model_copy(update={"answer": answer.answer.model_copy(update=body), "sources": sources,
                                     "unknowns": unknowns})
    return Answer.model_validate(held.model_dump()).to_json()
