"""Decision examples for the answerability gate (and the evidence selector): train prompts labelled answer or
refuse; an answerable one carries the gold answer for the documents it shows.

A classifier fitted on the adapted model's hidden states needs many more labelled prompts than the
supervised records hold, so the build derives them from train questions and train documents only:

- `answerable` (two per answerable question): all its gold documents plus 0 to 3 distractors;
- `same_topic` or `off_topic` (one per answerable question, alternating in a seeded order): 1 or 2
  documents of a gold document's topic that are not gold, plus 0 to 2 distractors; or 1 to 3
  distractors only. A same-topic document that states the gold answer, or one sentence of it, is
  not eligible (label noise); a question without an eligible one gets `off_topic`;
- `refusal` (one per train refusal): the documents its record shows plus 1 to 3 distractors.

The label is one rule: refuse exactly when a gold document is missing. Distractors are drawn like
the records' (`distractors`), so none can hold the answer. Ids are `<question_id>.gate.<kind>.<n>`;
the fitting code groups by the question id for cross-fitting. A draw whose prompt repeats a train
prompt of the build (or another example) is redrawn with the next seed, so the gate is never fitted
on a prompt the adapter was trained on; one that repeats an eval or heldout prompt stops the build.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from source_models import PLACEHOLDER, SourceDocument, SourceQuestion, distractors

from kwanzaa_adapter.data.records import RagRecord, render_user_turn
from kwanzaa_adapter.evaluation.metrics import content_words, split_sentences

DECISIONS_FILE = "kwanzaa_decisions.jsonl"
KINDS = ("answerable", "same_topic", "off_topic", "refusal")
# A same-topic document with a sentence holding this share of the gold answer's content words may
# state the answer, and would make "refuse" a wrong label.
ANSWER_SHARE = 0.6
# Files whose prompts a decision example must never repeat; a clash stops the build, not a redraw.
HELD_OUT_PREFIXES = ("kwanzaa_eval", "kwanzaa_heldout", "kwanzaa_paraphrase")
MAX_DRAWS = 100


def states_answer(document: SourceDocument, answer_text: str) -> bool:
    """Whether a sentence of the document holds ANSWER_SHARE of the content words of the answer (placeholders
    removed) or of one of its sentences: a document that states one half of a two-document answer is a partial
    answer, not a refusal. An answer without content words cannot be told apart, so every document counts."""
    answer = PLACEHOLDER.sub(" ", answer_text)
    targets = [words for words in map(content_words, [answer, *split_sentences(answer)]) if words]
    if not targets:
        return True
    sentences = [content_words(sentence) for sentence in split_sentences(document.text)]
    return any(len(target & sentence) >= ANSWER_SHARE * len(target) for target in targets for sentence in sentences)


def same_topic_documents(question: SourceQuestion, documents: dict[str, SourceDocument]) -> list[SourceDocument]:
    """Documents of the question's split and of a gold document's topic, neither gold nor stating the
    gold answer; sorted by doc_id."""
    topics = {documents[doc_id].topic for doc_id in question.doc_ids}
    return sorted((d for d in documents.values() if d.split == question.split and d.topic in topics
                   and d.doc_id not in question.doc_ids and not states_answer(d, question.answer_text)),
                  key=lambda d: d.doc_id)


def draw(kind: str, question: SourceQuestion, documents: dict[str, SourceDocument],
         rng: random.Random) -> list[SourceDocument]:
    """The documents one example of `kind` shows, in a seeded order."""
    pool = distractors(question, documents)
    if kind == "answerable":
        shown = [documents[doc_id] for doc_id in question.doc_ids] + rng.sample(pool, rng.randint(0, 3))
    elif kind == "same_topic":
        near = same_topic_documents(question, documents)
        shown = rng.sample(near, rng.randint(1, min(2, len(near)))) + rng.sample(pool, rng.randint(0, 2))
    elif kind == "off_topic":
        shown = rng.sample(pool, rng.randint(1, 3))
    else:
        shown = [documents[doc_id] for doc_id in question.shown_doc_ids] + rng.sample(pool, rng.randint(1, 3))
    rng.shuffle(shown)
    return shown


def planned_kinds(questions: list[SourceQuestion], documents: dict[str, SourceDocument],
                  seed: int) -> dict[str, list[str]]:
    """Train question id -> the kinds of its examples. The answerable questions, in a seeded order,
    alternate between a same-topic and an off-topic refusal, so each gets about half."""
    train = [q for q in questions if q.split == "train"]
    order = sorted((q for q in train if not q.is_refusal),
                   key=lambda q: random.Random(f"{seed}:gate:order:{q.id}").random())
    missing = {q.id: "same_topic" if rank % 2 == 0 and same_topic_documents(q, documents) else "off_topic"
               for rank, q in enumerate(order)}
    return {q.id: ["refusal"] if q.is_refusal else ["answerable", "answerable", missing[q.id]] for q in train}


def derive_decisions(questions: list[SourceQuestion], documents: dict[str, SourceDocument], seed: int,
                     avoid: set[str], answer_for) -> list[RagRecord]:
    """Every decision example, in source order; no prompt is in `avoid` or repeated. An answerable example
    carries its question's gold answer for the documents it shows (`answer_for(question, shown)`): the
    evidence selector learns from it which sentence answers."""
    by_id = {q.id: q for q in questions}
    seen = set(avoid)
    examples = []
    for question_id, kinds in planned_kinds(questions, documents, seed).items():
        question = by_id[question_id]
        for index, kind in enumerate(kinds):
            example_id = f"{question_id}.gate.{kind}.{kinds[:index].count(kind)}"
            for attempt in range(MAX_DRAWS):
                drawn = draw(kind, question, documents, random.Random(f"{seed}:gate:{example_id}:{attempt}"))
                shown = [d.as_document() for d in drawn]
                prompt = render_user_turn(question.question, shown)
                if prompt not in seen:
                    break
            else:
                raise ValueError(f"decision example {example_id!r}: {MAX_DRAWS} draws all repeat a prompt")
            seen.add(prompt)
            examples.append(RagRecord(id=example_id, question=question.question, documents=shown,
                                      expect_refusal=kind != "answerable",
                                      answer=answer_for(question, drawn) if kind == "answerable" else None))
    return examples


def user_turns(jsonl: str) -> set[str]:
    """Every user turn of a JSONL of chat lines or RAG records (a record's is its rendered prompt)."""
    turns: set[str] = set()
    for line in jsonl.splitlines():
        row = json.loads(line)
        if "messages" in row:
            turns |= {m["content"] for m in row["messages"] if m["role"] == "user"}
        else:
            record = RagRecord.model_validate(row)
            turns.add(render_user_turn(record.question, record.documents))
    return turns


def check_decisions(examples: list[RagRecord], prompts: dict[str, set[str]]) -> None:
    """Raise naming the first example whose id repeats or whose prompt is a user turn of a file in `prompts`."""
    ids = Counter(e.id for e in examples)
    for example in examples:
        if ids[example.id] > 1:
            raise ValueError(f"decision example {example.id!r}: the id is not unique")
        prompt = render_user_turn(example.question, example.documents)
        clashes = sorted(name for name, turns in prompts.items() if prompt in turns)
        if clashes:
            raise ValueError(f"decision example {example.id!r}: its prompt is a user turn of {', '.join(clashes)}")


def build_decisions(questions: list[SourceQuestion], documents: dict[str, SourceDocument], seed: int,
                    outputs: dict[str, str], answer_for) -> list[RagRecord]:
    """The examples, derived after every other file of the build (`outputs`) and checked against all of them."""
    prompts = {name: user_turns(content) for name, content in outputs.items()}
    avoid = set().union(*(turns for name, turns in prompts.items() if not name.startswith(HELD_OUT_PREFIXES)))
    examples = derive_decisions(questions, documents, seed, avoid, answer_for)
    check_decisions(examples, prompts)
    return examples


def decisions_summary(jsonl: str) -> str:
    """One line of counts: examples, the share to refuse, examples by kind, documents per example."""
    rows = [json.loads(line) for line in jsonl.splitlines()]
    kinds = Counter(row["id"].split(".gate.")[1].split(".")[0] for row in rows)
    refuse = sum(row["expect_refusal"] for row in rows)
    histogram = Counter(len(row["documents"]) for row in rows)
    return (f"{len(rows)} examples, {refuse} to refuse ({refuse / len(rows):.0%}): "
            + ", ".join(f"{kind} {kinds[kind]}" for kind in KINDS)
            + "; documents per example " + " ".join(f"{n}:{histogram[n]}" for n in sorted(histogram)))
