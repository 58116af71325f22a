"""HTTP API over one loaded model: contract answers, OpenAI-compatible chat, health.

- `POST /v1/answer`: {question, documents} -> {answer (kwanzaa.answer.v1) | error with raw output}
- `POST /v1/chat/completions`: OpenAI chat completions, non-streaming and streaming (SSE)
- `GET /healthz`: base model, adapter version and its verification status (never needs the key)

Every error is a JSON `{"error": {"type", "message"}}`; bad requests get a 4xx and the server
stays up. When `KWANZAA_ADAPTER_API_KEY` is set, every route but /healthz needs
`Authorization: Bearer <key>`. Bodies, documents, text lengths and generation lengths are bounded
(`ServeLimits`). Generation is serialized by the model's lock: one model, one generation at a time.
"""

from __future__ import annotations

import hmac
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from kwanzaa_adapter import __version__
from kwanzaa_adapter.data.records import Document, Message

if TYPE_CHECKING:  # the CLI reads ServeLimits' defaults without loading torch or FastAPI
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from kwanzaa_adapter.models.causal_lm import CausalLMModel, ChatStream

SERVE_EXTRA_MISSING = "the HTTP server needs the serve extra: pip install 'kwanzaa-adapter[serve]'"

API_KEY_ENV = "KWANZAA_ADAPTER_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on what one request may ask for; larger requests get a 4xx."""

    max_body_bytes: int = 1 << 20
    max_documents: int = 20
    max_question_chars: int = 4_000
    max_document_chars: int = 20_000
    max_messages: int = 32
    max_message_chars: int = 40_000
    max_new_tokens: int = 512


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="The user's question.")
    documents: list[Document] = Field(default_factory=list, description="Retrieved documents, cited as [n].")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Generation limit for this answer.")


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send fields this server does not use (user, stop, ...): accepted, ignored.
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy (the default here).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="One choice per request.")


def _error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _reject(status: int, message: str) -> Exception:
    from starlette.exceptions import HTTPException

    return HTTPException(status_code=status, detail=message)


# --------------------------------------------------------------------------- guard


class RequestGuard:
    """ASGI middleware: API key (all routes but /healthz) and request body size, before the app runs."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] != "/healthz" and not self._authorized(headers):
            response = _error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                              {"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        body, problem = await self._read_body(headers, receive)
        if problem is not None:
            return await problem(scope, receive, send)
        if body is None:  # the client went away
            return None
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, headers: dict) -> bool:
        scheme, _, token = headers.get("authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _read_body(self, headers: dict, receive) -> tuple[bytes | None, JSONResponse | None]:
        too_large = _error(413, "request_too_large", f"request body exceeds {self.max_body_bytes} bytes")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return None, _error(400, "invalid_request", "Content-Length is not a number")
            if int(declared) > self.max_body_bytes:
                return None, too_large
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return None, too_large
            if not message.get("more_body", False):
                return bytes(body), None


# --------------------------------------------------------------------------- app


def create_app(model: CausalLMModel, limits: ServeLimits = ServeLimits(), api_key: str | None = None) -> FastAPI:
    """The FastAPI app over `model`. `api_key` None: the server is open (bind it to loopback)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI(title="kwanzaa-adapter", version=__version__)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=limits.max_body_bytes)
    _install_error_handlers(app)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "model": model.name, **model.describe()}

    @app.post("/v1/answer")
    def answer(request: AnswerRequest) -> dict:
        check_answer_request(request, limits)
        tokens = generation_limit(request.max_new_tokens, model, limits, "max_new_tokens")
        result = model.answer(request.question, request.documents, max_new_tokens=tokens)
        return {"model": model.name, **result.to_json()}

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatCompletionRequest):
        check_chat_request(request, limits)
        asked = request.max_completion_tokens or request.max_tokens
        tokens = generation_limit(asked, model, limits, "max_tokens")
        messages = [m.model_dump() for m in request.messages]
        stream = model.stream_chat(messages, tokens, request.temperature, request.top_p)
        completion = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model.name}
        if request.stream:
            return StreamingResponse(sse_events(stream, completion), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text = "".join(stream)
        return {**completion, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stream.finish_reason}],
                "usage": {"prompt_tokens": stream.prompt_tokens, "completion_tokens": stream.completion_tokens,
                          "total_tokens": stream.prompt_tokens + stream.completion_tokens}}

    return app


def _install_error_handlers(app: FastAPI) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    from kwanzaa_adapter.models.causal_lm import PromptTooLongError

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return _error(400, "invalid_json", "the request body is not valid JSON")
        parts = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors[:10]]
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(PromptTooLongError)
    async def too_long(request, exc):
        return _error(413, "context_length_exceeded", str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        kind = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return _error(exc.status_code, kind.get(exc.status_code, "invalid_request"), str(exc.detail))


def generation_limit(asked: int | None, model: CausalLMModel, limits: ServeLimits, field: str) -> int:
    if asked is not None and asked > limits.max_new_tokens:
        raise _reject(422, f"{field}: {asked} exceeds this server's limit of {limits.max_new_tokens}")
    return asked or min(model.config.evaluation.max_new_tokens, limits.max_new_tokens)


def check_answer_request(request: AnswerRequest, limits: ServeLimits) -> None:
    if len(request.question) > limits.max_question_chars:
        raise _reject(413, f"question: {len(request.question)} characters, at most {limits.max_question_chars}")
    if len(request.documents) > limits.max_documents:
        raise _reject(413, f"documents: {len(request.documents)} given, at most {limits.max_documents}")
    for number, document in enumerate(request.documents, start=1):
        if len(document.text) > limits.max_document_chars:
            raise _reject(413, f"documents[{number}].text: {len(document.text)} characters, "
                               f"at most {limits.max_document_chars}")


def check_chat_request(request: ChatCompletionRequest, limits: ServeLimits) -> None:
    if len(request.messages) > limits.max_messages:
        raise _reject(413, f"messages: {len(request.messages)} given, at most {limits.max_messages}")
    total = sum(len(m.content) for m in request.messages)
    if total > limits.max_message_chars:
        raise _reject(413, f"messages: {total} characters in all, at most {limits.max_message_chars}")


def sse_events(stream: ChatStream, completion: dict) -> Iterator[str]:
    """OpenAI chat.completion.chunk events, then `data: [DONE]`; an error mid-stream is an error event."""

    def event(delta: dict, finish_reason: str | None = None) -> str:
        chunk = {**completion, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    yield event({"role": "assistant", "content": ""})
    try:
        for piece in stream:
            yield event({"content": piece})
    except Exception as exc:  # the status line is sent already: report it in the stream
        yield f"data: {json.dumps({'error': {'type': 'generation_failed', 'message': str(exc)}})}\n\n"
        return
    yield event({}, stream.finish_reason)
    yield "data: [DONE]\n\n"


# --------------------------------------------------------------------------- running


def api_key_from_environment() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def serve(model: CausalLMModel, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits = ServeLimits(),
          api_key: str | None = None) -> None:
    """Run the API with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(model, limits, api_key), host=host, port=port, log_level="info")


def serve_extra_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn"))
