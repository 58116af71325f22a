"""The HTTP server's guard: API key and body size, checked before any route runs; JSON errors."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse


def error_response(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def rejection(status: int, message: str) -> Exception:
    from starlette.exceptions import HTTPException

    return HTTPException(status_code=status, detail=message)


def _open(scope) -> bool:
    """Routes anyone may reach: /healthz (alive and ready, nothing more without the key) and the page (`GET /`,
    which holds no secret and asks the user for the key)."""
    return scope["path"] == "/healthz" or (scope["path"] == "/" and scope["method"] in ("GET", "HEAD"))


class RequestGuard:
    """ASGI middleware: API key (all routes but /healthz and the page) and request body size, before the app runs;
    `on_answer(route, status, seconds)` hears of every /v1/ request once its last byte is sent.
    A route reads `request.state.authorized`: the key was sent, or none is configured (/healthz says
    more to those)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_answer: Callable | None = None):
        self.app, self.max_body_bytes, self.on_answer = app, max_body_bytes, on_answer
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.on_answer is None or not scope["path"].startswith("/v1/"):
            return await self._guarded(scope, receive, send)
        started, status = time.monotonic(), [0]

        async def timed_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.on_answer(scope["path"], status[0], time.monotonic() - started)

        return await self._guarded(scope, receive, timed_send)

    async def _guarded(self, scope, receive, send):
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        authorized = self.api_key is None or self._authorized(headers)
        scope.setdefault("state", {})["authorized"] = authorized
        if not authorized and not _open(scope):
            response = error_response(401, "unauthorized",
                                      "missing or wrong API key: send 'Authorization: Bearer <key>'",
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
        too_large = error_response(413, "request_too_large", f"request body exceeds {self.max_body_bytes} bytes")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                return None, error_response(400, "invalid_request", "Content-Length is not a number")
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
