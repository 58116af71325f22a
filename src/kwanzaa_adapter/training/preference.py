"""The preference stage of step 5 (`training.preference`): DPO on the supervised adapter's own errors.

Each round mines, then trains:
- **Mining.** The adapter answers, greedily, `mining_examples` one-answer lines drawn (seeded by the
  run's seed and the round) from the mining file, which is the training data unless named. A line
  whose prompt is also in the eval split is never drawn. Every output is scored by SPEC section 6's
  metrics and the wrong ones become pairs: the gold answer as `chosen`, the adapter's own output as
  `rejected`, kind named by the first error found (`ERROR_KINDS`).
- **Near-miss pairs** (`near_miss_file`): a training question whose answering document was swapped
  for a same-subject one that lacks the fact. Chosen is the refusal; rejected is the original line's
  gold answer, which now cites a document that does not hold it.
- **Training.** TRL's `DPOTrainer` continues the same adapter on the same 4-bit base. The reference
  is the adapter as the round found it: TRL copies it into a frozen `ref` adapter, the reference
  log-probabilities are computed once before the first step, and the copy is dropped before the
  optimizer sees the parameters.

A round lives in `preference-<r>/` under the run: `pairs.jsonl` and `mining.json` (written whole
or not at all, and reused by a resumed run), then complete-or-absent checkpoints sealed with the
run's identity plus the pairs' digest, exactly like the supervised stage's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kwanzaa_adapter.config import ConfigError, KwanzaaConfig
from kwanzaa_adapter.evaluation.eval_set import (
    EvalItem,
    EvaluationDataError,
    eval_prompts,
    parse_eval_line,
    user_turns,
)
from kwanzaa_adapter.evaluation.metrics import score_example
from kwanzaa_adapter.generation.decoding import generate
from kwanzaa_adapter.training.checkpointing import RunIdentity, checkpoint_to_resume
from kwanzaa_adapter.training.rundir import checkpoints

log = logging.getLogger(__name__)

ERROR_KINDS = ("malformed", "answered_unanswerable", "refused_answerable", "miscited", "ungrounded")
NEAR_MISS = "near_miss"
PAIRS_FILE = "pairs.jsonl"
MINING_FILE = "mining.json"


@dataclass(frozen=True)
class MiningSet:
    """The one-answer lines a round may draw from, what was left out of them (by reason), and the
    eval split's prompts, which no pair may hold."""

    items: list[EvalItem]
    skipped: dict = field(default_factory=dict)
    eval_prompts: frozenset = frozenset()


@dataclass(frozen=True)
class Pair:
    id: str
    kind: str
    prompt: list[dict]
    chosen: str
    rejected: str

    def as_trl(self) -> dict:
        """TRL's conversational preference form: the prompt turns, then one assistant turn each."""
        return {"prompt": self.prompt, "chosen": [{"role": "assistant", "content": self.chosen}],
                "rejected": [{"role": "assistant", "content": self.rejected}]}


@dataclass
class Round:
    """What one round mined and trained; the stage's summary is the list of these."""

    round: int
    examples: int
    errors: dict
    near_miss: int
    pairs: int
    generation_seconds: float
    steps: int = 0
    train_seconds: float = 0.0
    train_tokens: int = 0
    final_loss: float | None = None
    reward_accuracy: float | None = None
    resumed_from: str | None = None  # the checkpoint the trainer loaded, from its own resume record
    resume: dict | None = None  # that record: start step, steps run, optimizer moments, scheduler, RNG


# --------------------------------------------------------------------------- data


def load_mining_set(path: str | Path, eval_path: str | Path, system_prompt: str) -> MiningSet:
    """One-answer chat lines of `path` that can be scored, minus any whose prompt is in the eval split.

    Dialogues (more than one assistant turn) and lines without meta.documents are skipped and counted;
    a line that is not valid JSON or chat form is an error naming file:line.
    """
    held_out = eval_prompts(eval_path, system_prompt)
    items, skipped = [], Counter()
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            value = _json_line(line, f"{path}:{number}")
            turns = value.get("messages") if isinstance(value, dict) else None
            if not isinstance(turns, list) or sum(1 for t in turns if isinstance(t, dict)
                                                  and t.get("role") == "assistant") != 1:
                skipped["not_one_answer"] += 1
                continue
            if "documents" not in (value.get("meta") or {}):
                skipped["no_documents"] += 1
                continue
            item = parse_eval_line(line, f"{path}:{number}", system_prompt)
            if user_turns(item) in held_out:
                skipped["in_eval_split"] += 1
                continue
            items.append(item)
    if not items:
        raise EvaluationDataError(f"{path}: no line to mine on: preference mining needs chat lines with one "
                                  "assistant turn and meta.id, meta.expect_refusal and meta.documents")
    return MiningSet(items, dict(skipped), frozenset(held_out))


def _json_line(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise EvaluationDataError(f"{where}: not a JSON line ({exc.msg} at char {exc.pos})") from None


def load_near_miss_pairs(path: str | Path, mining: MiningSet, system_prompt: str) -> list[Pair]:
    """Near-miss refusals paired with their original line's gold answer; every problem names file:line."""
    by_id = {item.id: item for item in mining.items}
    pairs = []
    path = Path(path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            item = parse_eval_line(line, where, system_prompt)
            original_id = (_json_line(line, where).get("meta") or {}).get("near_miss_of")
            if not isinstance(original_id, str):
                raise EvaluationDataError(f"{where}: meta.near_miss_of is missing: name the id of the mining-file "
                                          "line whose answering document this line swaps out")
            if user_turns(item) in mining.eval_prompts:
                raise EvaluationDataError(f"{where}: this prompt is in the eval split ({Path(path).name} would "
                                          "train on what the adapter is judged by)")
            original = by_id.get(original_id)
            if original is None:
                raise EvaluationDataError(f"{where}: meta.near_miss_of {original_id!r} is not a one-answer line of "
                                          "the mining file (or it is in the eval split)")
            if not item.example.expect_refusal or original.example.expect_refusal:
                raise EvaluationDataError(f"{where}: a near-miss line must expect a refusal and name an answerable "
                                          f"line; meta.expect_refusal is {item.example.expect_refusal} here and "
                                          f"{original.example.expect_refusal} on {original_id!r}")
            pairs.append(Pair(item.id, NEAR_MISS, item.prompt, item.reference, original.reference))
    return pairs


# --------------------------------------------------------------------------- mining


def error_kind(verdict: dict, expect_refusal: bool) -> str | None:
    """The first thing SPEC section 6's metrics find wrong with one scored output, or None."""
    if not verdict["json_valid"]:
        return "malformed"
    if expect_refusal != verdict["refused"]:
        return "answered_unanswerable" if expect_refusal else "refused_answerable"
    if verdict["citation_ok"] is False:
        return "miscited"
    if verdict["groundedness"] is not None and verdict["groundedness"] < 1.0:
        return "ungrounded"
    return None


def mine(model, tokenizer, items: list[EvalItem], *, max_new_tokens: int, batch_size: int,
         generate_fn: Callable | None = None) -> tuple[list[Pair], float]:
    """Generate on `items` and pair every wrong output with the gold answer; returns the pairs and seconds."""
    result = (generate_fn or generate)(model, tokenizer, [item.prompt for item in items], max_new_tokens=max_new_tokens,
                         batch_size=batch_size)
    pairs = []
    for item, output in zip(items, result.outputs, strict=True):
        kind = error_kind(score_example(item.example, output), item.example.expect_refusal)
        if kind is not None:
            pairs.append(Pair(item.id, kind, item.prompt, item.reference, output))
    return pairs, result.seconds


def draw(items: list[EvalItem], count: int, seed: int, round_number: int) -> list[EvalItem]:
    """The round's mining sample: seeded by the run's seed and the round, in file order."""
    if count >= len(items):
        return list(items)
    chosen = set(random.Random(f"{seed}:{round_number}").sample(range(len(items)), count))
    return [item for index, item in enumerate(items) if index in chosen]


def mine_round(config: KwanzaaConfig, model, tokenizer, mining: MiningSet, near_miss: list[Pair],
               round_number: int, generate_fn: Callable | None = None) -> tuple[list[Pair], Round]:
    """One round's pairs: the adapter's errors on its sample, then the near-miss pairs, capped by max_pairs."""
    p = config.training.preference
    sample = draw(mining.items, p.mining_examples, config.run.seed, round_number)
    log.info("preference round %d: mining %d training examples", round_number, len(sample))
    mined, seconds = mine(model, tokenizer, sample, max_new_tokens=config.evaluation.max_new_tokens,
                          batch_size=config.evaluation.batch_size, generate_fn=generate_fn)
    pairs = [*mined, *near_miss]
    if p.max_pairs is not None and len(pairs) > p.max_pairs:
        keep = set(random.Random(f"{config.run.seed}:{round_number}:cap").sample(range(len(pairs)), p.max_pairs))
        pairs = [pair for index, pair in enumerate(pairs) if index in keep]
    errors = Counter(pair.kind for pair in mined)
    summary = Round(round_number, len(sample), {kind: errors.get(kind, 0) for kind in ERROR_KINDS},
                    sum(1 for pair in pairs if pair.kind == NEAR_MISS), len(pairs), round(seconds, 1))
    log.info("preference round %d: %d wrong of %d (%s), %d pairs with %d near-miss", round_number, len(mined),
             len(sample), ", ".join(f"{k} {v}" for k, v in summary.errors.items() if v), len(pairs),
             summary.near_miss)
    return pairs, summary


def pairs_text(pairs: list[Pair]) -> str:
    return "".join(json.dumps(asdict(pair), sort_keys=True) + "\n" for pair in pairs)


def write_round_data(directory: Path, pairs: list[Pair], summary: Round) -> None:
    """pairs.jsonl, then mining.json, each renamed into place: mining.json marks the round's data complete."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in ((PAIRS_FILE, pairs_text(pairs)),
                       (MINING_FILE, json.dumps(asdict(summary), indent=2, sort_keys=True) + "\n")):
        staging = directory / f".tmp-{name}"
        staging.write_text(text, encoding="utf-8")
        os.replace(staging, directory / name)


def read_round_data(directory: Path) -> tuple[list[Pair], Round] | None:
    """A round's mined data as a resumed run finds it; None when mining did not finish."""
    if not (directory / MINING_FILE).is_file():
        return None
    pairs = [Pair(**json.loads(line)) for line in (directory / PAIRS_FILE).read_text(encoding="utf-8").splitlines()]
    return pairs, Round(**json.loads((directory / MINING_FILE).read_text(encoding="utf-8")))


# --------------------------------------------------------------------------- the stage


def check_preference_data(config: KwanzaaConfig) -> tuple[MiningSet, list[Pair]]:
    """Step 1's check of the stage's data: the mining file is not the eval split, and it and the near-miss
    file read as the stage will read them (every problem names its file and line, exit 2)."""
    p = config.training.preference
    mining_file = p.mining_file or config.data.train_file
    if Path(mining_file).resolve() == Path(config.data.eval_file).resolve():
        raise ConfigError([f"training.preference.mining_file: {mining_file} is the eval split (data.eval_file); "
                           "mine on training data, never on what the adapter is judged by"])
    mining = load_mining_set(mining_file, config.data.eval_file, config.data.system_prompt)
    near_miss = load_near_miss_pairs(p.near_miss_file, mining, config.data.system_prompt) if p.near_miss_file \
        else []
    return mining, near_miss


def run_preference(config: KwanzaaConfig, bundle, run, identity: RunIdentity, resume: bool = False,
                   callbacks: tuple = (), reporters: tuple = (), is_main: bool = True,
                   generate_fn: Callable | None = None) -> dict:
    """Every round of the stage on `bundle.model` (trained in place); returns the stage's summary.

    Every process mines (greedy decoding gives each the same pairs) and trains its share; the main one
    writes the round's files.
    """
    from kwanzaa_adapter.training.preference_trainer import run_preference_trainer

    p = config.training.preference
    mining, near_miss = check_preference_data(config)
    rounds = []
    started = time.perf_counter()
    for number in range(1, p.rounds + 1):
        directory = run.path / f"preference-{number}"
        found = read_round_data(directory) if resume else None
        pairs, summary = found or mine_round(config, bundle.model, bundle.tokenizer, mining, near_miss, number,
                                             generate_fn)
        if found is None and is_main:
            write_round_data(directory, pairs, summary)
        rounds.append(summary)
        if not pairs:
            log.warning("preference round %d: no pairs mined; the adapter keeps the weights it has", number)
            break
        round_identity = RunIdentity(identity.config_sha256,
                                     {**identity.datasets, "preference_pairs": hashlib.sha256(pairs_text(pairs).encode()).hexdigest()},
                                     identity.base_model_digest)
        resume_from = checkpoint_to_resume(directory, round_identity) if resume and checkpoints(directory) else None
        trained = run_preference_trainer(config, bundle, directory, [pair.as_trl() for pair in pairs],
                                         round_identity, resume_from, callbacks, reporters)
        for key, value in trained.items():
            setattr(summary, key, value)
        summary.resumed_from = (summary.resume or {}).get("checkpoint")
        if is_main:
            write_round_data(directory, pairs, summary)
    return {"enabled": True, "beta": p.beta, "sft_weight": p.sft_weight, "learning_rate": p.learning_rate,
            "num_epochs": p.num_epochs, "mining_examples": p.mining_examples, "mining_skipped": mining.skipped,
            "near_miss_file": p.near_miss_file, "rounds": [asdict(r) for r in rounds],
            "pairs": sum(r.pairs for r in rounds), "steps": sum(r.steps for r in rounds),
            "seconds": round(time.perf_counter() - started, 1)}
