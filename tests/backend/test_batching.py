"""The serving request batcher: batched greedy outputs equal one-at-a-time ones, each row with its own
limit and its own stop; a bounded queue, deadlines, cancellation and shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import build_tiny_model
from helpers import Collector, prompt_ids
from kwanzaa_adapter.backend.serving.batching import RequestBatcher
from kwanzaa_adapter.backend.serving.tickets import QueueFull, QueueTimeout, ShuttingDown, Ticket

QUESTIONS = ["When is Kwanzaa?", "Who created Kwanzaa, and in which year was it first celebrated?",
             "What does Umoja mean?", "Name the seven principles of Kwanzaa, in order, with a word on each one.",
             "Where?"]


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return build_tiny_model("llama", len(tokenizer), seed=3)


def run(engine: RequestBatcher, tokenizer, limits: list[int], questions=QUESTIONS) -> list[Ticket]:
    tickets = [Ticket(prompt_ids(tokenizer, q), n, Collector()) for q, n in zip(questions, limits)]
    for ticket in tickets:
        engine.submit(ticket)
    for ticket in tickets:
        ticket.outcome = ticket.emit.result()
    return tickets


def test_batched_greedy_outputs_equal_one_at_a_time(tiny, tokenizer):
    limits = [12, 5, 9, 16, 3]  # each request its own max_tokens; prompts of different lengths
    single = RequestBatcher(tiny, tokenizer, max_batch_size=1)
    alone = run(single, tokenizer, limits)
    single.close()
    batches = []
    engine = RequestBatcher(tiny, tokenizer, max_batch_size=8, gather_s=0.5,
                         on_batch=lambda tickets, seconds: batches.append(len(tickets)))
    together = run(engine, tokenizer, limits)
    engine.close()
    assert max(batches) > 1  # they really were generated together
    for a, b, limit in zip(alone, together, limits):
        assert a.ids == b.ids and a.outcome == b.outcome
        assert len(b.ids) <= limit
        assert b.outcome[0] == tokenizer.decode(b.ids, skip_special_tokens=True)  # the deltas add up
        assert b.finish_reason == ("length" if len(b.ids) == limit else "stop")


def test_a_full_queue_refuses_with_a_retry_hint_and_a_stale_request_times_out(tiny, tokenizer):
    engine = RequestBatcher(tiny, tokenizer, max_batch_size=1, max_queue=2, queue_timeout_s=0.3)
    hold = threading.Event()
    engine.submit(Ticket(prompt_ids(tokenizer, "hold"), 1, lambda event: hold.wait(10)))  # occupies the worker
    time.sleep(0.3)
    waiting = [Ticket(prompt_ids(tokenizer, q), 2, Collector()) for q in QUESTIONS[:2]]
    for ticket in waiting:
        engine.submit(ticket)
    with pytest.raises(QueueFull) as refused:
        engine.submit(Ticket(prompt_ids(tokenizer, "one too many"), 2, Collector()))
    assert refused.value.retry_after_s >= 1 and engine.queue_depth == 2
    time.sleep(0.5)
    hold.set()
    for ticket in waiting:
        text, reason, error = ticket.emit.result()
        assert isinstance(error, QueueTimeout) and ticket.ids == []  # never generated
    engine.close()


def test_a_cancelled_request_leaves_its_batch_and_the_others_finish(tiny, tokenizer):
    engine = RequestBatcher(tiny, tokenizer, max_batch_size=4, gather_s=0.5)
    gone = Ticket(prompt_ids(tokenizer, QUESTIONS[0]), 40, Collector())
    stays = Ticket(prompt_ids(tokenizer, QUESTIONS[1]), 40, Collector())
    first = threading.Event()
    original = gone.emit

    def cancel_after_first(event):
        original(event)
        gone.cancel()
        first.set()

    gone.emit = cancel_after_first
    engine.submit(gone)
    engine.submit(stays)
    _, reason, _ = original.result()
    assert reason == "cancelled" and len(gone.ids) < 40
    assert stays.emit.result()[1] in ("stop", "length") and len(stays.ids) > len(gone.ids)
    engine.close()


def test_shutdown_refuses_new_requests_and_ends_late_ones_with_an_error(tiny, tokenizer):
    engine = RequestBatcher(tiny, tokenizer, max_batch_size=1)
    slow = Ticket(prompt_ids(tokenizer, QUESTIONS[3]), 10_000, Collector())
    slow.emit = _slowed(slow.emit)
    engine.submit(slow)
    time.sleep(0.5)
    engine.close(grace_s=0.5)
    text, reason, error = slow.emit.inner.result()
    assert isinstance(error, ShuttingDown) and text  # ended with an error event, after some tokens
    with pytest.raises(ShuttingDown):
        engine.submit(Ticket(prompt_ids(tokenizer, "late"), 2, Collector()))


def _slowed(collector: Collector):
    def emit(event):
        time.sleep(0.01)
        collector(event)

    emit.inner = collector
    return emit
