"""One model, many clients: concurrent generation requests gathered into batches (serving).

A request is a `Ticket`: prompt ids, its own `max_new_tokens`, its own sampling settings and random
state (`seed`), its own stop sequences, an optional constraint (a grammar that decides which tokens
may come next) and an `emit` callback. `BatchEngine` runs one worker thread: it takes the oldest
waiting ticket, waits at most `gather_s` for company, and generates up to `max_batch_size` tickets
together (left padding, one `model.generate`; or the fast engine). Each row chooses its own tokens:
greedy, or sampled from its own generator, so that a seeded answer is the same alone or in any
batch. Each row ends on its own: at an end-of-turn token, at one of its stop sequences (the text
ends before it), at its own token limit, when its constraint is complete, or when its client goes
away (`Ticket.cancel`). Tokens are decoded as they come and emitted as `delta` events (a tail that
may begin a stop sequence is held back until it is known not to), then one `done` (or `error`) event.

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
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from kwanzaa_adapter.generation.decoding import end_of_turn_ids, left_padding, request_sampler
from kwanzaa_adapter.generation.gate import AnswerabilityGate, GateLogits, decision_label, gate_tap
from kwanzaa_adapter.generation.llamacpp import Row

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are waiting already; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class QueueTimeout(Exception):
    """The request waited longer than the queue timeout and was not generated."""


class ShuttingDown(Exception):
    """The server is stopping: the request was not taken, or was ended at the end of the grace period."""


@dataclass(frozen=True)
class Event:
    kind: str  # "delta" | "done" | "error"
    text: str = ""
    finish_reason: str | None = None  # done: "stop", "length" or "cancelled"
    error: Exception | None = None


@dataclass(eq=False)
class Ticket:
    prompt_ids: list[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    constraint: object | None = None  # .restrict(row scores), .advance(token), .done (generation/grammar.py)
    gated: bool = False  # the engine's answerability gate decides answer or refuse for this ticket
    stop: tuple[str, ...] = ()  # stop sequences: the answer ends before the first one it contains
    seed: int | None = None  # the sampler's random state (temperature > 0); None: a fresh one
    gate: dict | None = None  # after generation, when gated: {"decision", "refuse_probability"}
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _decoded: str = ""  # the whole answer decoded so far; `text` is what was emitted of it

    def __post_init__(self) -> None:
        self.sample = request_sampler(*self.sampling, self.seed)  # None: greedy

    @property
    def sampling(self) -> tuple[float, float]:
        return (self.temperature, self.top_p) if self.temperature > 0 else (0.0, 1.0)

    def take_text(self, text: str) -> None:
        """The answer decoded so far: emit what is new, up to a stop sequence (then finish) or short of a
        tail that may begin one (held back until the next token tells)."""
        self._decoded = text
        found = [at for stop in self.stop if (at := text.find(stop)) >= 0]
        if found:
            self._decoded = text[:max(min(found), len(self.text))]
            self.finish("stop")
            return
        held = max((k for stop in self.stop for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])),
                   default=0)
        self._send(text[:len(text) - held])

    def _send(self, text: str) -> None:
        delta, self.text = text[len(self.text):], text
        if delta:
            self.emit(Event("delta", text=delta))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        """The client went away: drop it from its batch (or from the queue) at the next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def finish(self, reason: str) -> None:
        if not self.finished:
            if len(self._decoded) > len(self.text):  # a held-back tail that began no stop sequence after all
                self._send(self._decoded)
            self.finish_reason = reason
            self.emit(Event("done", finish_reason=reason))

    def fail(self, error: Exception) -> None:
        if not self.finished:
            self.finish_reason = "error"
            self.emit(Event("error", error=error))


class _Rows(BaseStreamer):
    """The batch's per-row bookkeeping, hooked into `generate` three ways: tokens arrive (streamer),
    rows end (stopping criteria), constraints mask the next token (logits processor)."""

    def __init__(self, engine: BatchEngine, batch: list[Ticket]):
        self.engine, self.batch, self.prompt_seen = engine, batch, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the streamer the prompt first
            self.prompt_seen = True
            return
        now = time.monotonic()
        for ticket, token in zip(self.batch, value.reshape(-1).tolist()):
            if ticket.finished:
                continue
            if token in self.engine.stop_ids:
                ticket.finish("stop")
                continue
            ticket.ids.append(token)
            ticket.first_token_at = ticket.first_token_at or now
            if ticket.constraint is not None:
                ticket.constraint.advance(token)
            self.engine.emit_text(ticket)
            if len(ticket.ids) >= ticket.max_new_tokens:
                ticket.finish("length")
            elif ticket.constraint is not None and ticket.constraint.done:
                ticket.finish("stop")

    def end(self) -> None:
        pass

    def stopped(self, input_ids: torch.LongTensor) -> torch.BoolTensor:
        aborting = self.engine.aborting
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


class BatchEngine:
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
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
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
            except Exception as exc:  # noqa: BLE001 - every client of the batch hears of it; the engine goes on
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
            self._running = batch
            return batch

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
        """The batch on the fast engine: the same tickets, events and endings, one sequence per ticket."""
        rows = [Row(t.prompt_ids, t.max_new_tokens, t.constraint, gated=t.gated and self.gate is not None,
                    sample=t.sample, json_only=False) for t in batch]
        record = _recorder(batch)
        gate = self.gate if any(row.gated for row in rows) else None
        for index, token in self.fast.decode(self.tokenizer, rows, self.stop_ids, gate):
            ticket, row = batch[index], rows[index]
            if row.gated and ticket.gate is None:
                record(index, row.refuse, row.probability)
            if ticket.cancelled:
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
