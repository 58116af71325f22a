"""One model, many clients: concurrent generation requests gathered into batches (serving).

A request is a `Ticket`: prompt ids, its own `max_new_tokens`, its own sampling settings and random
state (`seed`), its own stop sequences, an optional constraint (a grammar that decides which tokens
may come next) and an `emit` callback. `RequestBatcher` runs one worker thread: it takes the oldest
waiting ticket, waits at most `gather_s` for company, and generates up to `max_batch_size` tickets
together (left padding, one `model.generate`; or the fast engine). Each row chooses its own tokens:
greedy, or sampled from its own generator, so that a seeded answer is the same alone or in any
batch. On the fast engine, tickets that arrive while a batch decodes join it at its next step
(continuous batching, `_generate_fast`). Each row ends on its own: at an end-of-turn token, at one
of its stop sequences (the text ends before it), at its own token limit, when its constraint is
complete, or when its client goes away (`Ticket.cancel`). Tokens are decoded as they come and
emitted as `delta` events (a tail that may begin a stop sequence is held back until it is known not
to), then one `done` (or `error`) event.

The queue is bounded: beyond `max_queue` waiting tickets `submit` raises QueueFull (HTTP 429 with
Retry-After), and a ticket that waited longer than `queue_timeout_s` is answered QueueTimeout (503)
without being generated. `close(grace_s)` refuses new tickets, lets running ones finish within the
grace period, then ends the rest with an error event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from kwanzaa_adapter.backend.serving.tickets import QueueFull, QueueTimeout, ShuttingDown, Ticket
from kwanzaa_adapter.generation.decoding import end_of_turn_ids, left_padding
from kwanzaa_adapter.generation.gate import AnswerabilityGate, GateLogits, decision_label, gate_tap
from kwanzaa_adapter.generation.llamacpp import Row

log = logging.getLogger(__name__)


class _Rows(BaseStreamer):
    """The batch's per-row bookkeeping, hooked into `generate` three ways: tokens arrive (streamer),
    rows end (stopping criteria), constraints mask the next token (logits processor)."""

    def __init__(self, batcher: RequestBatcher, batch: list[Ticket]):
        self.batcher, self.batch, self.prompt_seen = batcher, batch, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the streamer the prompt first
            self.prompt_seen = True
            return
        now = time.monotonic()
        for ticket, token in zip(self.batch, value.reshape(-1).tolist()):
            if ticket.finished:
                continue
            if token in self.batcher.stop_ids:
                ticket.finish("stop")
                continue
            ticket.ids.append(token)
            ticket.first_token_at = ticket.first_token_at or now
            if ticket.constraint is not None:
                ticket.constraint.advance(token)
            self.batcher.emit_text(ticket)
            if len(ticket.ids) >= ticket.max_new_tokens:
                ticket.finish("length")
            elif ticket.constraint is not None and ticket.constraint.done:
                ticket.finish("stop")

    def end(self) -> None:
        pass

    def stopped(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        aborting = self.batcher.aborting
        for ticket in self.batch:
            if ticket.cancelled:
                ticket.finish("cancelled")
            elif aborting:
                ticket.fail(ShuttingDown("the server stopped before this answer was complete"))
        return torch.tensor([t.finished for t in self.batch], dtype=torch.bool, device=input_ids.device)

    def mask(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, ticket in enumerate(self.batch):
            if ticket.constraint is not None and not ticket.finished:
                scores[row] = ticket.constraint.restrict(scores[row])
        return scores

    def choose(self, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Each sampled row draws its token from its own generator; generate()'s greedy pick then takes it."""
        for row, ticket in enumerate(self.batch):
            if ticket.sample is not None and not ticket.finished:
                token = ticket.sample(scores[row])
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class _Stopping(StoppingCriteria):
    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids, scores, **kwargs):
        return self.rows.stopped(input_ids)


class _Constraints(LogitsProcessor):
    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids, scores):
        return self.rows.mask(scores)


class _Sampling(LogitsProcessor):  # last: it samples from what the grammar and the gate allow
    def __init__(self, rows: _Rows):
        self.rows = rows

    def __call__(self, input_ids, scores):
        return self.rows.choose(scores)


def _recorder(batch: list[Ticket]):
    """Writes each gated ticket's decision as it is made, before its first token is streamed."""
    def record(row: int, refuse: bool | None, probability: float | None) -> None:
        if refuse is not None:
            batch[row].gate = {"decision": decision_label(refuse), "refuse_probability": probability}
    return record


class RequestBatcher:
    def __init__(self, model, tokenizer, *, max_batch_size: int = 8, max_queue: int = 64,
                 queue_timeout_s: float = 60.0, gather_s: float = 0.005, on_batch: Callable | None = None,
                 lock: threading.Lock | None = None, gate: AnswerabilityGate | None = None, fast=None):
        if max_batch_size < 1 or max_queue < 0 or queue_timeout_s <= 0 or gather_s < 0:
            raise ValueError("max_batch_size >= 1, max_queue >= 0, queue_timeout_s > 0 and gather_s >= 0")
        self.model, self.tokenizer, self.gate = model, tokenizer, gate
        self.fast = fast  # the fast engine (generation.llamacpp.LlamaCppEngine) generates when given
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.queue_timeout_s, self.gather_s = queue_timeout_s, gather_s
        self.on_batch = on_batch  # called with (tickets, seconds) after each batch: metrics
        self.lock = lock or threading.Lock()  # held while generating: the model is shared with other callers
        self.stop_ids = end_of_turn_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.device = next(model.parameters()).device
        self._waiting: deque[Ticket] = deque()
        self._running: list[Ticket] = []
        self._cond = threading.Condition()
        self._closing = False
        self._abort_at: float | None = None
        self._seconds_per_batch = 1.0  # a running estimate, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="request-batcher", daemon=True)
        self._thread.start()

    # --- the client side

    def submit(self, ticket: Ticket) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                batches_ahead = len(self._waiting) // self.max_batch_size + 1
                raise QueueFull(len(self._waiting), max(1, round(batches_ahead * self._seconds_per_batch)))
            self._waiting.append(ticket)
            self._cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        return sum(not t.finished for t in self._running)

    @property
    def ready(self) -> bool:
        """Taking requests: the worker runs and no shutdown has begun."""
        return not self._closing and self._thread.is_alive()

    @property
    def aborting(self) -> bool:
        return self._abort_at is not None and time.monotonic() >= self._abort_at

    def begin_close(self, grace_s: float = 30.0) -> None:
        """Refuse new tickets; those already taken (waiting or running) have `grace_s` to be answered,
        then they end with an error event. Returns at once."""
        with self._cond:
            if not self._closing:
                self._closing = True
                self._abort_at = time.monotonic() + grace_s
            self._cond.notify_all()

    def close(self, grace_s: float = 30.0) -> None:
        """`begin_close`, then wait for the worker to stop."""
        self.begin_close(grace_s)
        self._thread.join(timeout=grace_s + 30)

    # --- the worker

    def emit_text(self, ticket: Ticket) -> None:
        text = self.tokenizer.decode(ticket.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            ticket.take_text(text)

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            started = time.monotonic()
            try:
                with self.lock:
                    self._generate(batch)
            except Exception as exc:  # noqa: BLE001 - every client of the batch hears of it; the batcher goes on
                log.exception("batch of %d failed", len(batch))
                for ticket in batch:
                    with contextlib.suppress(Exception):  # one client's broken callback stops no other
                        ticket.fail(exc)
            seconds = time.monotonic() - started
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds
            with self._cond:
                self._running = []
            if self.on_batch is not None:
                self.on_batch(batch, seconds)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in list(self._waiting):
            if self.aborting:
                self._waiting.remove(ticket)
                ticket.fail(ShuttingDown("the server stopped before this request's turn came"))
            elif ticket.cancelled:
                self._waiting.remove(ticket)
            elif now - ticket.enqueued_at > self.queue_timeout_s:
                self._waiting.remove(ticket)
                ticket.fail(QueueTimeout(f"waited {now - ticket.enqueued_at:.1f} s in the queue, longer than "
                                         f"{self.queue_timeout_s:g} s"))

    def _take(self) -> list[Ticket] | None:
        with self._cond:
            while True:
                self._expire()
                if self._waiting:
                    break
                if self._closing:
                    return None
                self._cond.wait(timeout=0.5)
            deadline = time.monotonic() + self.gather_s
            while len(self._waiting) < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(timeout=left)
            batch = list(self._waiting)[: self.max_batch_size]  # rows sample apart: any settings mix
            for ticket in batch:
                self._waiting.remove(ticket)
                ticket.started_at = time.monotonic()
            self._running = batch  # the same list: tickets that join the batch later count as running
            return batch

    def _join(self, free: int, fits: Callable[[int, int], bool]) -> list[Ticket]:
        """The oldest waiting tickets, at most `free`, that start now in the running batch: in order, up to
        the first that does not fit (it waits for the batch to end, and is not passed over)."""
        with self._cond:
            self._expire()
            taken = []
            for ticket in self._waiting:
                if len(taken) == free or self.aborting or not fits(len(ticket.prompt_ids), ticket.max_new_tokens):
                    break
                taken.append(ticket)
            for ticket in taken:
                self._waiting.remove(ticket)
                ticket.started_at = time.monotonic()
            return taken

    def _generate(self, batch: list[Ticket]) -> None:
        if self.fast is not None:
            self._generate_fast(batch)
            return
        with left_padding(self.tokenizer):
            inputs = self.tokenizer.pad({"input_ids": [t.prompt_ids for t in batch]}, return_tensors="pt")
        inputs = inputs.to(self.device)
        rows = _Rows(self, batch)
        processors = LogitsProcessorList([_Constraints(rows)] if any(t.constraint for t in batch) else [])
        gate = self.gate if any(t.gated for t in batch) else None
        with torch.inference_mode(), gate_tap(self.model, gate) as tap:
            if gate is not None:  # after the grammar: of the tokens it allows, the decision keeps its own
                processors.append(GateLogits(self.tokenizer, inputs["input_ids"].shape[1], gate=gate, tap=tap,
                                             active=[t.gated for t in batch], on_decision=_recorder(batch)))
            if any(t.sample is not None for t in batch):
                processors.append(_Sampling(rows))
            self.model.generate(**inputs, max_new_tokens=max(t.max_new_tokens for t in batch),
                                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, use_cache=True,
                                streamer=rows, stopping_criteria=StoppingCriteriaList([_Stopping(rows)]),
                                logits_processor=processors, do_sample=False)
        for ticket in batch:  # generate() stopped at the longest limit: every row has ended
            ticket.finish("length" if len(ticket.ids) >= ticket.max_new_tokens else "stop")

    def _generate_fast(self, batch: list[Ticket]) -> None:
        """The batch on the fast engine: the same tickets, events and endings, one sequence per ticket.

        Continuous batching: tickets that arrive meanwhile join the running batch at its next step while
        a sequence is free and their prompt fits the context, which is sized for the batch's own
        requests and a quarter more (`_join`); the others wait for the next batch."""
        def as_row(ticket: Ticket) -> Row:
            return Row(ticket.prompt_ids, ticket.max_new_tokens, ticket.constraint,
                       gated=ticket.gated and self.gate is not None, sample=ticket.sample, json_only=False)

        def join(free: int, fits: Callable[[int, int], bool]) -> list[Row]:
            taken = self._join(free, fits)
            batch.extend(taken)  # `_running` too (the same list); the engine appends their rows to `rows`
            return [as_row(ticket) for ticket in taken]

        rows, record = [as_row(ticket) for ticket in batch], _recorder(batch)
        room = (self.max_batch_size, max(len(t.prompt_ids) + t.max_new_tokens for t in batch) * 5 // 4,
                max(len(t.prompt_ids) for t in batch) * 5 // 4)
        for index, token in self.fast.decode(self.tokenizer, rows, self.stop_ids, self.gate, join=join, room=room):
            ticket, row = batch[index], rows[index]
            if row.gated and ticket.gate is None:
                record(index, row.refuse, row.probability)
            if token is None:  # this row alone failed (its grammar, its sampler): the others decode on
                log.warning("a request of the batch failed after %d tokens: %s", len(ticket.ids), row.error)
                ticket.fail(RuntimeError(f"generation failed after {len(ticket.ids)} tokens: {row.error}"))
            elif ticket.cancelled:
                ticket.finish("cancelled")
            elif self.aborting:
                ticket.fail(ShuttingDown("the server stopped before this answer was complete"))
            elif token in self.stop_ids:
                ticket.finish("stop")
            else:  # the engine advanced the ticket's constraint itself
                ticket.ids.append(token)
                ticket.first_token_at = ticket.first_token_at or time.monotonic()
                self.emit_text(ticket)
                if len(ticket.ids) >= ticket.max_new_tokens:
                    ticket.finish("length")
                elif ticket.constraint is not None and ticket.constraint.done:
                    ticket.finish("stop")
            row.done = row.done or ticket.finished
        for ticket in batch:
            ticket.finish("length" if len(ticket.ids) >= ticket.max_new_tokens else "stop")
