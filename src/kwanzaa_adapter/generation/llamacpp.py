"""The fast engine: llama.cpp, through the C API of `llama-cpp-python`, decoding a GGUF of the model.

The high-level `llama_cpp.Llama` decodes one sequence at a time and marks its logits-processor path
as possibly broken, so this module drives the C API itself: each prompt is pre-filled into its own
sequence of one shared KV cache, then every unfinished sequence advances one token per
`llama_decode`, a batch of one token per sequence. After each step the logits of every row go
through what shapes the answers on the reference path, unchanged: the contract's grammar
(llguidance, `ContractConstraint.restrict`) and the answerability gate (`GateLogits.hold`), then the
greedy choice. Prompts are token ids from the Hugging Face tokenizer, and outputs are decoded by it,
so both engines read and write the same tokens.

The gate's features come from this engine: an evaluation callback (`cb_eval`) copies the output of
the gate's decoder block (llama.cpp's tensor `l_out-<layer - 1>`) at the prompt's last token while
the prompt is pre-filled. The callback sees every tensor of every graph, so a context that does not
need it is made without it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from kwanzaa_adapter.generation.decoding import GenerationResult, cannot_be_json, until_stop
from kwanzaa_adapter.generation.gate import AnswerabilityGate, GateLogits
from kwanzaa_adapter.generation.grammar import SchemaGrammar
from kwanzaa_adapter.generation.llamacpp_api import BlockTap, EngineUnavailable, bindings
from kwanzaa_adapter.generation.prefixes import batch_order, longest_shared

ENGINE_NAME = "llama.cpp"
log = logging.getLogger(__name__)


@dataclass
class Row:
    """One sequence to decode: its prompt, limit and what shapes it; its tokens and decision as it goes.

    A consumer of `LlamaCppEngine.decode` may set `done` between tokens to end a row (a client gone). A row
    that fails on its own (its grammar, its sampler) ends with `error` set, and the others decode on.
    """

    prompt: list[int]
    max_new_tokens: int
    constraint: object | None = None  # .restrict(scores), .advance(token): the grammar (generation/grammar.py)
    gated: bool = False  # the gate decides answer or refuse for this row (with a gate)
    refuse: bool | None = None  # the decision: the gate's, or given beforehand (forced)
    probability: float | None = None  # the gate's P(refuse)
    sample: Callable[[torch.Tensor], int] | None = None  # None: greedy
    json_only: bool = True  # end as soon as the output cannot be a JSON object (`NotAJsonObject`)
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended by an end-of-turn token
    done: bool = False
    error: Exception | None = None  # why this row alone failed (`decode` yields (index, None) when it does)


class LlamaCppEngine:
    """A GGUF loaded in llama.cpp; `generate` mirrors `generation.decoding.generate` on token ids."""

    name = ENGINE_NAME

    def __init__(self, gguf: str | Path, *, threads: int | None = None, gate_layer: int | None = None):
        self.api = api = bindings()
        self.path = Path(gguf)
        params = api.llama_model_default_params()
        # The weights are read into this process's memory, not mapped from the file: a later write to the
        # file cannot change the weights that answer, and the logit check (`logit_check`) sees those weights.
        params.use_mmap = False
        self.model = api.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise EngineUnavailable(f"llama.cpp cannot load {self.path}")
        self.vocab = api.llama_model_get_vocab(self.model)
        self.vocab_size = api.llama_vocab_n_tokens(self.vocab)
        self.width = api.llama_model_n_embd(self.model)
        self.window = api.llama_model_n_ctx_train(self.model)
        self.threads = threads or min(os.cpu_count() or 1, 8)
        self.tap = BlockTap(gate_layer, self.width) if gate_layer else None
        self._held = None  # (context, (sequences, tokens per sequence, batch), llama_batch)
        self.prefilled = [0, 0]  # prompt tokens computed, and read from a shared prefix instead
        self.lock = threading.Lock()

    def close(self) -> None:
        self._free()
        if self.model:
            self.api.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass

    # --- the context, batches, pre-fill

    def _context(self, sequences: int, tokens: int, batch: int):
        """The context for `sequences` sequences of `tokens` each, pre-filled `batch` tokens at a time,
        cleared; remade only when it must grow. Each sequence has its own KV stream (not one unified
        cache), so that a step attends over its own tokens only, not over every sequence's."""
        held, need = self._held, (sequences, tokens, batch)
        if held is None or any(have < n for have, n in zip(held[1], need)):
            shape = tuple(max(have, n) for have, n in zip(held[1], need)) if held is not None else need
            self._free()
            params = self.api.llama_context_default_params()
            params.n_ctx, params.n_seq_max = shape[0] * shape[1], shape[0]
            params.n_batch = params.n_ubatch = shape[2]
            params.kv_unified, params.no_perf = False, True
            params.n_threads = params.n_threads_batch = self.threads
            if self.tap is not None:
                params.cb_eval = self.tap.callback
            context = self.api.llama_init_from_model(self.model, params)
            if not context:
                raise EngineUnavailable(f"llama.cpp cannot make a context of {shape[0]} x {shape[1]} tokens")
            held = self._held = (context, shape, self.api.llama_batch_init(max(shape[0], shape[2]), 0, shape[0]))
        self.api.llama_memory_clear(self.api.llama_get_memory(held[0]), True)
        return held

    def _free(self) -> None:
        if self._held is not None:
            self.api.llama_free(self._held[0])
            self.api.llama_batch_free(self._held[2])
            self._held = None

    def _decode(self, held, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence, wants_logits) entries."""
        context, _, batch = held
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
            batch.seq_id[i][0], batch.logits[i] = sequence, logits
        batch.n_tokens = len(entries)
        status = self.api.llama_decode(context, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed ({status}): the KV cache is too small for the batch")

    def _logits(self, held, index: int) -> torch.Tensor:
        pointer = self.api.llama_get_logits_ith(held[0], index)
        return torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(self.vocab_size,)).copy())

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position of one prompt (tokens x vocab): for logits checks."""
        with self.lock:
            held = self._context(1, len(prompt), len(prompt))
            self._decode(held, [(token, position, 0, True) for position, token in enumerate(prompt)])
            return torch.stack([self._logits(held, i) for i in range(len(prompt))])

    def _prefill(self, held, prompt: list[int], sequences: Sequence[int], features: bool,
                 shared: tuple[int, int] | None = None):
        """Pre-fill one prompt once, into the first of `sequences`, and copy it to the others (llama.cpp
        copies the KV stream at the next decode): (last position's logits, the gate block's output
        there, or None). With `shared` (sequence, n), the first n tokens are already in that sequence:
        its KV is copied over and only the rest is computed."""
        memory = self.api.llama_get_memory(held[0])
        start = 0
        if shared is not None:
            source, start = shared
            self.api.llama_memory_seq_cp(memory, source, sequences[0], -1, -1)  # a whole stream, then cut
            if not self.api.llama_memory_seq_rm(memory, sequences[0], start, -1):  # a memory that cannot cut
                self.api.llama_memory_seq_rm(memory, sequences[0], -1, -1)
                start = 0
        self.prefilled[0] += len(prompt) - start
        self.prefilled[1] += start
        if features:
            self.tap.armed, self.tap.value = True, None
        try:
            self._decode(held, [(prompt[position], position, sequences[0], position == len(prompt) - 1)
                                for position in range(start, len(prompt))])
        finally:
            if self.tap is not None:
                self.tap.armed = False
        for sequence in sequences[1:]:
            self.api.llama_memory_seq_cp(memory, sequences[0], sequence, -1, -1)
        return self._logits(held, -1), (torch.from_numpy(self.tap.value) if features else None)

    # --- decoding

    def generate(self, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                 stop_ids: Sequence[int], progress: bool = True, grammar: SchemaGrammar | None = None,
                 gate: AnswerabilityGate | None = None, forced: Sequence[bool] | None = None,
                 gated: Sequence[bool] | None = None):
        """Greedy decoding of token-id prompts in batches; a `GenerationResult` in prompt order.

        With a `gate`, `gated` (one flag per prompt, default all) says which prompts it decides: the
        same prompt given gated and not (the adapter with and without its gate) is pre-filled once."""
        if forced is not None and len(forced) != len(prompts):
            raise ValueError(f"{len(forced)} forced decisions for {len(prompts)} prompts")
        if gated is not None and len(gated) != len(prompts):
            raise ValueError(f"{len(gated)} gate flags for {len(prompts)} prompts")
        order = batch_order(prompts)  # prompts with a long beginning in common in one batch, longest first
        rows: list[Row | None] = [None] * len(prompts)
        started, before = time.perf_counter(), list(self.prefilled)
        bar = tqdm(total=len(prompts), desc=f"generating ({self.name})", unit="prompt", disable=not progress)
        for first in range(0, len(order), batch_size):
            indices = order[first: first + batch_size]
            batch = [Row(list(prompts[i]), max_new_tokens, grammar.constraint() if grammar else None,
                         gated=gate is not None and forced is None and (gated is None or gated[i]),
                         refuse=forced[i] if forced is not None else None)
                     for i in indices]
            for index, token in self.decode(tokenizer, batch, stop_ids, gate if forced is None else None,
                                            hold=gate is not None or forced is not None):
                if token is None:  # the output so far stands (scored as it is); the other rows go on
                    log.warning("%s: prompt %d failed after %d tokens: %s", self.name, indices[index],
                                len(batch[index].tokens), batch[index].error)
            for index, row in zip(indices, batch):
                rows[index] = row
            bar.update(len(indices))
        bar.close()
        computed, copied = (now - then for now, then in zip(self.prefilled, before))
        log.info("%s: %d prompt tokens pre-filled, %d more copied from beginnings shared with another prompt",
                 self.name, computed, copied)
        counted, outputs, ids = 0, [], []
        for row in rows:
            tokens, stopped = until_stop(row.tokens, list(stop_ids))
            counted += len(tokens) + stopped
            ids.append(tokens)
            outputs.append(tokenizer.decode(tokens, skip_special_tokens=True))
        held = gate is not None or forced is not None
        return GenerationResult(outputs, counted, time.perf_counter() - started, ids,
                                [row.refuse for row in rows] if held else [],
                                [row.probability for row in rows] if held else [])

    def decode(self, tokenizer, rows: list[Row], stop_ids: Sequence[int], gate: AnswerabilityGate | None = None,
               hold: bool | None = None, join: Callable | None = None,
               room: tuple[int, int, int] | None = None) -> Iterator[tuple[int, int | None]]:
        """Decode `rows` together, yielding (row index, token) as each token is chosen, or (row index, None)
        when that row alone fails (its `error` says why; the others go on); holds the engine.

        Each prompt is pre-filled once (the gate reads its features there, for the rows it decides)
        and copied into the sequence of every other row that has it; then all unfinished rows advance
        one token per `llama_decode`. A row ends at an
        end-of-turn token (yielded too), at its limit, or when its consumer sets `done`. `hold`
        (default: with a gate) holds each decided row to its decision (`GateLogits.hold`).

        Continuous batching: `join(free, fits)`, when given, is asked before each step for rows to start
        now, at most `free`, each one that `fits(prompt tokens, new tokens)` the context; they are appended
        to `rows`, pre-filled into sequences of their own, and decode from the next step. `room`
        (sequences, tokens per sequence, pre-fill tokens) sizes the context for them from the start.
        """
        with self.lock:
            yield from self._decode_rows(tokenizer, rows, stop_ids, gate, gate is not None if hold is None else hold,
                                         join, room)

    def _decode_rows(self, tokenizer, rows, stop_ids, gate, hold, join, room) -> Iterator[tuple[int, int]]:
        longest = max(len(row.prompt) + row.max_new_tokens for row in rows)
        if longest > self.window:
            raise ValueError(f"a prompt and its new tokens ({longest}) exceed the model's context window of "
                             f"{self.window} tokens")
        needed = (len(rows), longest, max(len(row.prompt) for row in rows))
        decoder = self._context(*(max(n, min(r, self.window)) for n, r in zip(needed, room or needed)))
        holding = GateLogits(tokenizer, 0, forced=[False]) if hold else None
        scores: list[torch.Tensor | None] = [None] * len(rows)
        follows, slots = self._prefill_rows(decoder, rows, gate, scores)
        while True:
            decoding, parting = [], []
            for index, row in enumerate(rows):
                if row.done:
                    continue
                try:
                    token = self._choose(row, scores[index], holding, stop_ids)
                except Exception as exc:  # noqa: BLE001 - this row's grammar or sampler: it alone ends
                    row.error, row.done = exc, True
                    yield index, None
                    continue
                stop = token in stop_ids
                yield index, token
                if row.done:  # its consumer ended it
                    continue
                if stop:
                    row.done = row.stopped = True
                    continue
                if len(row.tokens) >= row.max_new_tokens or (row.json_only and cannot_be_json(tokenizer, row.tokens)):
                    row.done = True
                    continue
                leader = follows.get(index)
                if leader is not None:
                    if leader in decoding and rows[leader].tokens[-1] == token:
                        continue  # the same token after the same tokens: the leader's decoding serves both
                    parting.append((index, follows.pop(index)))  # its own copy of the leader's KV from now on
                decoding.append(index)
            self._arrange(decoder, slots, decoding, parting)
            if not self._join(decoder, rows, join, gate, scores, follows, slots) and not decoding:
                return
            decoding.sort(key=slots.__getitem__)
            if decoding:
                self._decode(decoder, [(rows[i].tokens[-1], len(rows[i].prompt) + len(rows[i].tokens) - 1,
                                        slots[i], True) for i in decoding])
            for position, index in enumerate(decoding):
                scores[index] = self._logits(decoder, position)
            for index, leader in follows.items():
                scores[index] = scores[leader]

    @staticmethod
    def _choose(row: Row, scores: torch.Tensor, holding: GateLogits | None, stop_ids: Sequence[int]) -> int:
        """The row's next token: its grammar, then its decision, then greedy or its sampler."""
        if row.constraint is not None:
            scores = row.constraint.restrict(scores)
        if holding is not None and row.refuse is not None:
            scores = holding.hold(row.tokens, scores, row.refuse)
        token = row.sample(scores) if row.sample is not None else int(scores.argmax())
        if row.constraint is not None and token not in stop_ids:
            row.constraint.advance(token)
        row.tokens.append(token)
        return token

    def _join(self, decoder, rows: list[Row], join: Callable | None, gate, scores: list, follows: dict,
              slots: dict) -> int:
        """Rows that start now (continuous batching), pre-filled into the free sequences after those that
        decode (`_arrange` has made them 0..n-1): how many joined. A row that follows another's sequence
        (the same prompt, the same tokens so far) holds a sequence in reserve: it needs one of its own
        when it parts (another limit, a stop, a client gone)."""
        sequences, tokens, batch = decoder[1]
        free = sequences - len(slots) - sum(not rows[i].done for i in follows)
        if join is None or free <= 0:
            return 0
        new = join(free, lambda prompt, limit: prompt <= batch and prompt + limit <= tokens)
        if not new:
            return 0
        first, first_scores = len(rows), [None] * len(new)
        decoding = [(rows[i].prompt, slot) for i, slot in slots.items()]
        joined_follows, joined_slots = self._prefill_rows(decoder, new, gate, first_scores, len(slots), decoding)
        rows.extend(new)
        scores.extend(first_scores)
        follows.update({first + i: first + leader for i, leader in joined_follows.items()})
        slots.update({first + i: slot for i, slot in joined_slots.items()})
        return len(new)

    def _arrange(self, decoder, slots: dict[int, int], decoding: list[int], parting: list[tuple[int, int]]) -> None:
        """Give the rows decoding this step the KV sequences 0..n-1, in the order of those they hold.

        llama.cpp puts the tokens of separate KV streams into one micro-batch only where their
        sequence ids follow each other (`split_equal`): a gap left by a finished row would split
        each step into several graph computations. So a parting follower first gets a copy of its
        leader's KV (read where it is now), rows that no longer decode give their sequence up, and
        the others move down into the gaps. llama.cpp performs the copies, in order, at the next
        decode."""
        memory = self.api.llama_get_memory(decoder[0])
        taken = set(slots.values())
        free = (sequence for sequence in range(decoder[1][0]) if sequence not in taken)
        for index, leader in parting:
            slots[index] = next(free)
            self.api.llama_memory_seq_cp(memory, slots[leader], slots[index], -1, -1)
        active = set(decoding)
        for index in [i for i in slots if i not in active]:
            self.api.llama_memory_seq_rm(memory, slots.pop(index), -1, -1)
        for target, index in enumerate(sorted(decoding, key=slots.__getitem__)):
            if slots[index] != target:
                self.api.llama_memory_seq_cp(memory, slots[index], target, -1, -1)
                self.api.llama_memory_seq_rm(memory, slots[index], -1, -1)
                slots[index] = target

    def _prefill_rows(self, decoder, rows: list[Row], gate: AnswerabilityGate | None, scores: list,
                      first_slot: int = 0, sources: Sequence[tuple[Sequence[int], int]] = ()
                      ) -> tuple[dict[int, int], dict[int, int]]:
        """Pre-fill each distinct prompt once, into KV sequences from `first_slot` on, decide the gated
        rows, and set each row's first scores: ({follower: leader}, {row: its KV sequence}).

        A prompt that begins with tokens already in a sequence (`sources`: (prompt, sequence) pairs, and
        the prompts pre-filled before it here), the same documents asked another question, say, starts
        from a copy of that sequence's KV and computes only the rest (`longest_shared`).

        Greedy rows of one prompt share one sequence while they choose the same tokens. A follower
        parts when its token differs (the gate held it elsewhere, say) and then decodes on its own
        copy of the leader's KV; sampled rows get their own copy at once."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(tuple(row.prompt), []).append(index)
        follows, slots = {}, {}
        there = list(sources)
        for prompt, indices in groups.items():
            leader, *others = indices
            shares = [i for i in others if rows[i].sample is None and rows[leader].sample is None]
            follows.update({i: leader for i in shares})
            own = [leader, *(i for i in others if i not in shares)]
            for index in own:  # a sequence of its own each (not len(slots) once for all of them)
                slots[index] = first_slot + len(slots)
            features = gate is not None and any(rows[i].gated for i in indices)
            if features and (self.tap is None or self.tap.name != f"l_out-{gate.layer - 1}".encode()):
                raise ValueError(f"this engine was loaded without a tap on block {gate.layer}: pass gate_layer")
            logits, hidden = self._prefill(decoder, list(prompt), [slots[i] for i in own], features,
                                           longest_shared(prompt, there))
            there.append((prompt, slots[leader]))
            probability = gate.refuse_probability(hidden[None]) if features else None
            for index in indices:
                scores[index] = logits
                if features and rows[index].gated:
                    rows[index].refuse = gate.refuses(probability)[0]
                    rows[index].probability = round(float(probability[0]), 4)
        return follows, slots
