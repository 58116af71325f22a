"""The FastAPI app of `kwanzaa-adapter serve`: routes over the request batcher (see `server`)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from kwanzaa_adapter.backend.models.causal_lm import AnswerResult, CausalLMModel
from kwanzaa_adapter.backend.serving.batching import RequestBatcher
from kwanzaa_adapter.backend.serving.guard import RequestGuard, error_response, rejection
from kwanzaa_adapter.backend.serving.metrics import ServeMetrics
from kwanzaa_adapter.backend.serving.page import render_page
from kwanzaa_adapter.backend.serving.schema_cache import SchemaCache
from kwanzaa_adapter.backend.serving.schemas import (
    AnswerRequest,
    ChatCompletionRequest,
    ServeLimits,
    ServeOptions,
    check_answer_request,
    check_chat_request,
    generation_limit,
)
from kwanzaa_adapter.backend.serving.tickets import Event, Ticket
from kwanzaa_adapter.data.records import render_user_turn
from kwanzaa_adapter.generation.gate import reached_decision


def build_app(model: CausalLMModel, limits: ServeLimits, api_key: str | None, options: ServeOptions) -> FastAPI:
    batcher = RequestBatcher(model.model, model.tokenizer, max_batch_size=options.max_batch_size,
                         max_queue=options.max_queue, queue_timeout_s=options.queue_timeout_s,
                         gather_s=options.gather_ms / 1000, lock=model.lock, gate=model.gate,
                         fast=model.fast)
    metrics = ServeMetrics(lambda: batcher.queue_depth, lambda: batcher.in_flight)
    batcher.on_batch = metrics.batch_done
    grammars = SchemaCache(model, limits, options)
    model.contract_grammar  # noqa: B018 - compiled now (about half a second), not in the first request
    app = FastAPI(title="kwanzaa-adapter", version=importlib.metadata.version("kwanzaa-adapter"))
    app.state.batcher, app.state.metrics, app.state.grammars = batcher, metrics, grammars
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes, on_answer=metrics.answered)
    _install_error_handlers(app)

    @app.get("/healthz")
    def healthz(request: Request) -> JSONResponse:
        # Open to all: alive and ready. Paths, digests, verification and the queue: to holders of the key
        # (with no key configured, every route is open, and so are they).
        ready = batcher.ready
        body = {"status": "ok" if ready else "shutting_down", "ready": ready}
        if request.state.authorized:
            body |= {"model": model.name, **model.describe(),
                     "queue": {"depth": batcher.queue_depth, "in_flight": batcher.in_flight,
                               "max_batch_size": batcher.max_batch_size, "max_queue": batcher.max_queue}}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    page, page_headers = render_page(limits, key_required=api_key is not None)

    @app.get("/")
    def try_the_adapter() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.post("/v1/answer")
    async def answer(body: AnswerRequest, request: Request):
        check_answer_request(body, limits)
        tokens = generation_limit(body.max_new_tokens, model, limits, "max_new_tokens")
        ids = model.encode(model.prompt_for(body.question, body.documents), tokens)
        pending = Pending(batcher, ids, tokens, constraint=grammars.contract() if body.constrained else None,
                          gated=model.gate is not None)

        def finished(text: str) -> dict:
            result = model.finish(AnswerResult.from_output(text, pending.ticket.gate), body.question, body.documents)
            return {"model": model.name, **result.to_json()}

        if body.stream:
            first = await pending.first_event()  # a queue timeout is still a 503, not a broken stream
            return StreamingResponse(answer_events(pending, first, finished, metrics),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = await pending.text(request)
        metrics.first_token.labels("/v1/answer").observe(pending.first_token_s)
        return finished(text)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_chat_request(body, limits)
        tokens = generation_limit(body.max_completion_tokens or body.max_tokens, model, limits, "max_tokens")
        messages = chat_messages(body, model.config.data.system_prompt, options.default_system_prompt)
        ids = model.encode(messages, tokens)
        # A client's own response_format is its own contract: the gate, which forces the kwanzaa answer's
        # decision, stays out of it, and the reply says so.
        own_format = body.response_format is not None and body.response_format.type != "text"
        constraint = await grammars.for_format(body.response_format)  # compiled off the event loop
        pending = Pending(batcher, ids, tokens, body.temperature, body.top_p, constraint,
                          gated=model.gate is not None and not own_format, stop=body.stop_sequences, seed=body.seed)
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
        if model.gate is not None and own_format:
            completion["gate"] = {"applied": False, "reason": "the request brings its own response_format"}
        if body.stream:
            first = await pending.first_event()  # a queue timeout is still a 503, not a broken stream
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(sse_events(pending, first, completion, metrics, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = await pending.text(request)
        metrics.first_token.labels("/v1/chat/completions").observe(pending.first_token_s)
        gate = {"gate": gate_report(pending.ticket.gate, text)} if pending.ticket.gate is not None else {}
        return {**completion, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": pending.ticket.finish_reason}],
                "usage": pending.usage(), **gate}

    return app


def gate_report(decision: dict, text: str) -> dict:
    """What the gate did to a chat reply: its decision where the reply reached the answer contract's values it
    holds, else that it could not act (a free-text reply: no decision to report)."""
    if reached_decision(text):
        return {"applied": True, **decision}
    return {"applied": False, "reason": "the reply is free text, not the answer contract: the gate's decision "
                                        "had nothing to hold"}


def chat_messages(body: ChatCompletionRequest, system_prompt: str, default_system_prompt: bool) -> list[dict]:
    """The request's turns as the adapter was trained on them: documents rendered into the last user turn
    with the training template, and the training system prompt where the request brings none."""
    messages = [m.model_dump() for m in body.messages]
    if body.documents is not None:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise rejection(422, "documents: given, but no user message holds the question")
        last = users[-1]
        messages[last] = {"role": "user", "content": render_user_turn(messages[last]["content"], body.documents)}
    if default_system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


class ClientGone(Exception):
    """The client went away while its answer was generated (logged as 499; nobody reads the reply)."""


class Pending:
    """One request in the request batcher, seen from the event loop."""

    def __init__(self, batcher: RequestBatcher, ids: list[int], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, constraint=None, gated: bool = False, stop: tuple[str, ...] = (),
                 seed: int | None = None):
        self.loop, self.events = asyncio.get_running_loop(), asyncio.Queue()
        self.ticket = Ticket(ids, max_new_tokens, self._emit, temperature, top_p, constraint, gated=gated, stop=stop,
                             seed=seed)
        batcher.submit(self.ticket)  # QueueFull / ShuttingDown: the error handlers answer 429 / 503

    def _emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed (the server stopped): nobody is listening
            self.ticket.cancel()

    @property
    def first_token_s(self) -> float:
        ticket = self.ticket
        return (ticket.first_token_at or time.monotonic()) - ticket.enqueued_at

    def usage(self) -> dict:
        prompt, completion = len(self.ticket.prompt_ids), len(self.ticket.ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def first_event(self) -> Event:
        event = await self.events.get()
        if event.kind == "error" and not self.ticket.ids:
            raise event.error
        return event

    async def text(self, request: Request) -> str:
        """The whole answer; the ticket is cancelled if the client goes away meanwhile."""
        parts, checked = [], time.monotonic()
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() - checked >= 0.5:  # tokens may flow without a pause: look at the clock
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.ticket.cancel()
                    raise ClientGone("the client closed the connection before the answer was complete")
            if event is None:
                continue
            if event.kind == "delta":
                parts.append(event.text)
            elif event.kind == "error":
                raise event.error
            else:
                return "".join(parts)

    async def stream(self, first: Event) -> AsyncIterator[Event]:
        event = first
        try:
            while True:
                yield event
                if event.kind != "delta":
                    return
                event = await self.events.get()
        finally:
            if not self.ticket.finished:  # the client went away: leave the batch
                self.ticket.cancel()


def stream_error(error: Exception) -> dict:
    """An error after a stream's status line was sent, as the stream reports it."""
    kind = "shutting_down" if type(error).__name__ == "ShuttingDown" else "generation_failed"
    return {"error": {"type": kind, "message": str(error)}}


async def sse_events(pending: Pending, first: Event, completion: dict, metrics,
                     include_usage: bool = False) -> AsyncIterator[str]:
    """OpenAI chat.completion.chunk events, then `data: [DONE]`; an error mid-stream is an error event.
    With `include_usage`, every chunk has `usage: null` and a last one, with no choices, the usage."""

    def chunk(delta: dict | None, finish_reason: str | None = None) -> str:
        choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta is not None else []
        usage = {"usage": pending.usage() if delta is None else None} if include_usage else {}
        body = {**completion, "object": "chat.completion.chunk", "choices": choices, **usage}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    async for event in pending.stream(first):
        if event.kind == "delta":
            yield chunk({"content": event.text})
        elif event.kind == "error":  # the status line is sent already: report it in the stream
            yield f"data: {json.dumps(stream_error(event.error))}\n\n"
            return
        else:
            metrics.first_token.labels("/v1/chat/completions").observe(pending.first_token_s)
            yield chunk({}, pending.ticket.finish_reason)
            if include_usage:
                yield chunk(None)
            yield "data: [DONE]\n\n"


async def answer_events(pending: Pending, first: Event, finished, metrics) -> AsyncIterator[str]:
    """A streamed /v1/answer: `delta` events with the text as generated, then `answer` (the answer as the product
    hands it out, `finished(text)`, with the usage and the seconds since the request was queued) or `error`."""

    def event(kind: str, data: dict) -> str:
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    parts = []
    async for item in pending.stream(first):
        if item.kind == "delta":
            parts.append(item.text)
            yield event("delta", {"text": item.text})
        elif item.kind == "error":
            yield event("error", stream_error(item.error))
            return
        else:
            metrics.first_token.labels("/v1/answer").observe(pending.first_token_s)
            seconds = time.monotonic() - pending.ticket.enqueued_at
            yield event("answer", {**finished("".join(parts)), "usage": pending.usage(), "seconds": round(seconds, 3)})


def _install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from kwanzaa_adapter.backend.models.causal_lm import PromptTooLongError
    from kwanzaa_adapter.backend.serving.tickets import QueueFull, QueueTimeout, ShuttingDown
    from kwanzaa_adapter.backend.serving.schema_cache import SchemasBusy

    @app.exception_handler(QueueFull)
    async def queue_full(request, exc):
        return error_response(429, "queue_full", str(exc), {"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(SchemasBusy)
    async def schemas_busy(request, exc):
        return error_response(429, "schemas_busy", str(exc), {"Retry-After": "1"})

    @app.exception_handler(QueueTimeout)
    async def queue_timeout(request, exc):
        return error_response(503, "queue_timeout", str(exc), {"Retry-After": "1"})

    @app.exception_handler(ClientGone)
    async def client_gone(request, exc):
        return error_response(499, "client_closed_request", str(exc))

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request, exc):
        return error_response(503, "shutting_down", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:10]]
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(PromptTooLongError)
    async def too_long(request, exc):
        return error_response(413, "context_length_exceeded", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return error_response(exc.status_code, kind.get(exc.status_code, "invalid_request"), str(exc.detail))
