"""Key facts: the short strings a right answer must state, and the one normalisation that compares them.

A key fact is stated by a text when, both normalised, the fact appears in the text as a whole run of
words. Normalising lower-cases, drops citation markers and the commas inside numbers ("1,000"),
drops the possessive "'s", turns every other non-alphanumeric character into a space, and writes number words as digits
("seven" -> "7", "ninth" -> "9th"), so "Seven principles." states the fact "7 principles". The same rule checks the
data (every key fact must be stated by one of its record's gold documents) and scores the answers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from kwanzaa_adapter.contract import CITATION_MARKER

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({word: str(10 * tens) for tens, word in
                      enumerate("thirty forty fifty sixty seventy eighty ninety".split(), start=3)})
_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
_NUMBER_WORDS.update({word: f"{value}{'st' if value == 1 else 'nd' if value == 2 else 'rd' if value == 3 else 'th'}"
                      for value, word in enumerate(_ORDINALS, start=1)})
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_POSSESSIVE = re.compile(r"['\u2019]s\b")
_NOT_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lower-case words and digits separated by single spaces, number words as digits."""
    text = _DIGIT_COMMA.sub("", CITATION_MARKER.sub(" ", text).lower())
    words = _NOT_WORD.sub(" ", _POSSESSIVE.sub("", text)).split()
    return " ".join(_NUMBER_WORDS.get(word, word) for word in words)


def states(text: str, fact: str) -> bool:
    """Whether `text` states `fact`: the normalised fact is a run of whole words of the normalised text."""
    wanted = normalize(fact)
    return bool(wanted) and f" {wanted} " in f" {normalize(text)} "


def missing_facts(text: str, facts: Iterable[str]) -> list[str]:
    """The facts `text` does not state, in their order."""
    return [fact for fact in facts if not states(text, fact)]
