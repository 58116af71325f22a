"""The paraphrase set's one rule: its answerable questions are phrased with few of their gold documents' words."""

from __future__ import annotations

from source_models import SourceDocument, SourceQuestion

from kwanzaa_adapter.evaluation.metrics import content_words

# The paraphrase set's answerable questions share at most this share of their content words with
# their gold documents, so that word matching does not find the answer.
PARAPHRASE_MAX_SHARED = 0.4


def paraphrase_shares(questions: list[SourceQuestion], documents: dict[str, SourceDocument]) -> dict[str, float]:
    """Question id -> share of its content words that its gold documents (title and text) hold, for every
    answerable question of the paraphrase set."""
    shares = {}
    for question in questions:
        if question.split == "paraphrase" and not question.is_refusal:
            words = content_words(question.question)
            gold = set().union(*(content_words(f"{documents[d].title} {documents[d].text}") for d in question.doc_ids))
            shares[question.id] = len(words & gold) / len(words) if words else 1.0
    return shares


def check_paraphrase(questions: list[SourceQuestion], documents: dict[str, SourceDocument]) -> dict[str, float]:
    """The paraphrase set's shares (`paraphrase_shares`); raises naming every question over PARAPHRASE_MAX_SHARED."""
    shares = paraphrase_shares(questions, documents)
    over = {qid: share for qid, share in shares.items() if share > PARAPHRASE_MAX_SHARED}
    if over:
        raise ValueError("paraphrase questions sharing more than "
                         f"{PARAPHRASE_MAX_SHARED:.0%} of their content words with their gold documents: "
                         + ", ".join(f"{qid} ({share:.0%})" for qid, share in sorted(over.items())))
    return shares
