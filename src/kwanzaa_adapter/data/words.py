"""Words and sentences as the metrics, the baselines and the evidence selector count them."""

from __future__ import annotations

import re

from kwanzaa_adapter.contract import CITATION_MARKER

# Function words only; words shorter than three letters are dropped before this list applies.
STOP_WORDS = frozenset(
    """
    about above after again against all also although among and any are because been before
    being below between both but can cannot could did does doing down during each either else ever
    every few for from further had has have having her here hers herself him himself his how however
    into its itself just least less many may might more most much must neither nor not now off once
    only other others our ours ourselves out over own per rather same she should since some such than
    that the their theirs them themselves then there these they this those though through thus too
    toward towards under until upon very via was were what whatever when where whether which while
    who whom whose why will with within without would yet you your yours yourself yourselves
    """.split()
)

_WORD = re.compile(r"[^\W_]+")
# A sentence ends at . ! or ? (and any [n] markers right after it) followed by whitespace or the end.
_SENTENCE_END = re.compile(r"[.!?]+(?:\s*\[\d+\])*(?=\s|$)")


def content_words(text: str) -> set[str]:
    """Lowercase alphanumeric tokens of three or more characters, minus stop words and [n] markers."""
    words = _WORD.findall(CITATION_MARKER.sub(" ", text).lower())
    return {word for word in words if len(word) >= 3 and word not in STOP_WORDS}


def split_sentences(text: str) -> list[str]:
    """Split after . ! ? followed by whitespace or the end; markers after the stop stay with it."""
    sentences, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    return [sentence for sentence in sentences if sentence]
