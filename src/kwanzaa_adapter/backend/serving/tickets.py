"""A request to the request batcher, as the batcher and the event loop both see it: a `Ticket` (prompt ids,
limits, sampling settings and random state, stop sequences, constraint, the `emit` callback, and the
answer as it grows), the `Event`s it emits, and the errors that refuse or end one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kwanzaa_adapter.generation.decoding import request_sampler


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
        self.sample = request_sampler(self.temperature, self.top_p, self.seed)  # None: greedy

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
