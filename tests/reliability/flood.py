"""A flood of bad requests for the HTTP server: every one must get a 4xx, and a good one must still
be answered afterwards. Used by tests/reliability/test_server_flood.py and bench/reliability.py.

`schema_flood` then sends, with the key, many distinct JSON Schemas (`response_format`) as large as
the server accepts, all at once, while /healthz is asked over and over: it must answer within 1 s.

The server runs with an API key and the default `ServeLimits`. The key is checked before the body
is read, so a request without it tests only the 401: the flood has a few of those (missing and
wrong keys, and some hostile bodies sent without a key) and is counted apart from the
authenticated bad requests, which carry the right key and so reach the body checks: wrong
methods, unknown routes, malformed and invalid-UTF-8 JSON, wrong types, values out of range,
oversized bodies (declared and chunked), too many documents or messages, texts over the limits,
generation lengths over the limit, and pathological JSON (deep nesting, huge numbers). Every
authenticated body is sent twice, with a Content-Length and chunked (without one): the server
reads the two differently.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from kwanzaa_adapter.backend.serving.schemas import ServeLimits

KEY = "flood-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"content-type": "application/json"}
DOCUMENT = {"title": "Kwanzaa", "text": "Kwanzaa is celebrated from December 26 to January 1."}
GOOD_ANSWER = {"question": "When is Kwanzaa celebrated?", "documents": [DOCUMENT], "max_new_tokens": 4}
GOOD_CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
ROUTES = ("/v1/answer", "/v1/chat/completions")


@dataclass(frozen=True)
class BadRequest:
    name: str
    method: str
    path: str
    headers: dict = field(default_factory=dict)
    body: bytes | None = None
    chunked: bool = False  # send the body without Content-Length, in pieces
    raw: bool = False  # written to the socket as is: headers that an HTTP client would not send

    @property
    def authenticated(self) -> bool:
        """Carries the right key, so the server's key check lets it through to the body checks."""
        return self.headers.get("Authorization") == AUTH["Authorization"]

    @property
    def group(self) -> str:
        return "authenticated" if self.authenticated else "unauthenticated"


def _json(value) -> bytes:
    return json.dumps(value).encode()


def _answer_payloads(limits: ServeLimits) -> dict[str, object]:
    long_text = "k" * (limits.max_document_chars + 1)
    return {
        "question_int": {"question": 5, "documents": [DOCUMENT]},
        "question_null": {"question": None},
        "question_list": {"question": ["a", "b"]},
        "question_object": {"question": {"text": "hi"}},
        "question_empty": {"question": ""},
        "question_missing": {"documents": [DOCUMENT]},
        "question_too_long": {"question": "q" * (limits.max_question_chars + 1)},
        "extra_field": {**GOOD_ANSWER, "admin": True},
        "documents_string": {"question": "q?", "documents": "all of them"},
        "documents_ints": {"question": "q?", "documents": [1, 2, 3]},
        "document_without_text": {"question": "q?", "documents": [{"title": "t"}]},
        "document_blank_title": {"question": "q?", "documents": [{"title": " ", "text": "x"}]},
        "document_extra_key": {"question": "q?", "documents": [{**DOCUMENT, "exec": "rm -rf /"}]},
        "document_text_too_long": {"question": "q?", "documents": [{"title": "t", "text": long_text}]},
        "too_many_documents": {"question": "q?", "documents": [DOCUMENT] * (limits.max_documents + 1)},
        "far_too_many_documents": {"question": "q?", "documents": [DOCUMENT] * 2000},
        "max_new_tokens_zero": {**GOOD_ANSWER, "max_new_tokens": 0},
        "max_new_tokens_negative": {**GOOD_ANSWER, "max_new_tokens": -5},
        "max_new_tokens_string": {**GOOD_ANSWER, "max_new_tokens": "many"},
        "max_new_tokens_float": {**GOOD_ANSWER, "max_new_tokens": 3.5},
        "max_new_tokens_over_limit": {**GOOD_ANSWER, "max_new_tokens": limits.max_new_tokens + 1},
        "max_new_tokens_huge": {**GOOD_ANSWER, "max_new_tokens": 10**12},
        "max_new_tokens_enormous": {**GOOD_ANSWER, "max_new_tokens": 10**400},
        "year_string": {"question": "q?", "documents": [{**DOCUMENT, "year": "nineteen"}]},
        "question_bool": {"question": True},
        "documents_null": {"question": "q?", "documents": None},
        "documents_object": {"question": "q?", "documents": DOCUMENT},
        "document_title_int": {"question": "q?", "documents": [{"title": 5, "text": "x"}]},
        "document_text_null": {"question": "q?", "documents": [{"title": "t", "text": None}]},
    }


def _chat_payloads(limits: ServeLimits) -> dict[str, object]:
    user = {"role": "user", "content": "hi"}
    return {
        "messages_missing": {"max_tokens": 4},
        "messages_empty": {"messages": []},
        "messages_string": {"messages": "hello"},
        "message_bad_role": {"messages": [{"role": "root", "content": "hi"}]},
        "message_no_content": {"messages": [{"role": "user"}]},
        "message_blank": {"messages": [{"role": "user", "content": "   "}]},
        "message_content_list": {"messages": [{"role": "user", "content": ["a"]}]},
        "too_many_messages": {"messages": [user] * (limits.max_messages + 1)},
        "messages_too_long": {"messages": [{"role": "user", "content": "m" * (limits.max_message_chars + 1)}]},
        "max_tokens_over_limit": {**GOOD_CHAT, "max_tokens": limits.max_new_tokens + 1},
        "max_tokens_huge": {**GOOD_CHAT, "max_tokens": 2**63},
        "max_completion_tokens_huge": {**GOOD_CHAT, "max_completion_tokens": 10**9},
        "max_tokens_negative": {**GOOD_CHAT, "max_tokens": -1},
        "temperature_too_high": {**GOOD_CHAT, "temperature": 9.0},
        "temperature_negative": {**GOOD_CHAT, "temperature": -1},
        "top_p_zero": {**GOOD_CHAT, "top_p": 0},
        "n_two": {**GOOD_CHAT, "n": 2},
        "stream_string": {**GOOD_CHAT, "stream": "yes please"},
        "messages_null": {"messages": None},
        "message_not_object": {"messages": ["hi"]},
        "message_role_missing": {"messages": [{"content": "hi"}]},
        "message_content_int": {"messages": [{"role": "user", "content": 5}]},
        "temperature_string": {**GOOD_CHAT, "temperature": "hot"},
        "top_p_above_one": {**GOOD_CHAT, "top_p": 1.5},
        "n_zero": {**GOOD_CHAT, "n": 0},
        "max_tokens_float": {**GOOD_CHAT, "max_tokens": 2.5},
        "model_int": {**GOOD_CHAT, "model": 5},
    }


def _malformed_bodies(limits: ServeLimits) -> dict[str, bytes]:
    return {
        "empty": b"",
        "open_brace": b"{",
        "open_bracket": b"[",
        "null": b"null",
        "number": b"1",
        "string": b'"question"',
        "list": b"[1, 2]",
        "single_quotes": b"{'question': 'x'}",
        "missing_value": b'{"question": }',
        "trailing_comma": b'{"question": "x",}',
        "nan": b'{"question": NaN}',
        "invalid_utf8": b'{"question": "\xff\xfe\xfd"}',
        "latin1": '{"question": "café"}'.encode("latin-1"),
        "nul_bytes": b'{"question": "a\x00b"}\x00\x00',
        "lone_surrogate": b'{"question": "\\ud800"}',
        "deep_nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep_object": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "huge_number": b'{"question": "x", "max_new_tokens": 1' + b"0" * 5000 + b"}",
        "duplicate_keys": b'{"question": "x", "question": 5}',
        "binary": bytes(range(256)) * 8,
        "oversized": b'{"question": "' + b"x" * (limits.max_body_bytes + 1) + b'"}',
    }


def _both_ways(name: str, route: str, headers: dict, body: bytes) -> Iterator[BadRequest]:
    """The body with a Content-Length, and chunked."""
    yield BadRequest(name, "POST", route, headers, body)
    yield BadRequest(f"{name} chunked", "POST", route, headers, body, chunked=True)


def bad_requests(limits: ServeLimits = ServeLimits()) -> Iterator[BadRequest]:
    """Every bad request of the flood (a few hundred), in a fixed order."""
    good = _json(GOOD_ANSWER)
    for path in (*ROUTES, "/admin", "/v1/models", "/docs", "/openapi.json"):
        yield BadRequest(f"no key {path}", "POST" if path in ROUTES else "GET", path, JSON, good)
    yield BadRequest("no key POST /", "POST", "/", JSON, good)  # GET / is the page, open like /healthz
    for name, value in {"wrong key": f"Bearer {KEY}x", "prefix of key": f"Bearer {KEY[:-1]}",
                        "basic scheme": f"Basic {KEY}", "bearer only": "Bearer", "no scheme": KEY,
                        "long key": "Bearer " + "k" * 8000, "lower case key": f"Bearer {KEY.upper()}",
                        "non-ascii key": "Bearer clé".encode()}.items():
        for path in ROUTES:
            yield BadRequest(f"{name} {path}", "POST", path, {**JSON, "Authorization": value}, good)
    for path in ROUTES:  # trailing space: httpx will not send it
        yield BadRequest(f"empty bearer {path}", "POST", path, {**JSON, "Authorization": "Bearer ",
                                                                "Content-Length": str(len(good))}, good, raw=True)
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        for path in ROUTES:
            yield BadRequest(f"{method} {path}", method, path, {**AUTH, **JSON}, good)
    yield BadRequest("POST /healthz", "POST", "/healthz", JSON, good)
    yield BadRequest("DELETE /healthz", "DELETE", "/healthz")
    for path in ("/v1/answer/extra", "/v1", "/v2/answer", "/%2e%2e/%2e%2e/etc/passwd", "/v1/answer%00",
                 "/" + "a" * 4000, "/v1/chat", "/v1/completions", "/metrics", "/healthz/../v1/answer2"):
        yield BadRequest(f"unknown route {path[:30]}", "POST", path, {**AUTH, **JSON}, good)
    for route in ROUTES:
        malformed = _malformed_bodies(limits)
        for name, body in malformed.items():
            yield from _both_ways(f"{name} {route}", route, {**AUTH, **JSON}, body)
        for name in ("oversized", "deep_nesting", "binary"):  # refused on the key, the body unread
            yield BadRequest(f"{name} without key {route}", "POST", route, JSON, malformed[name])
        yield BadRequest(f"declared oversized without key {route}", "POST", route,
                         {**JSON, "Content-Length": str(limits.max_body_bytes * 64)}, b"{}", raw=True)
        yield BadRequest(f"chunked oversized {route}", "POST", route, {**AUTH, **JSON},
                         b"[" + b"1," * (limits.max_body_bytes // 2 + 10) + b"1]", chunked=True)
        yield BadRequest(f"declared oversized {route}", "POST", route,
                         {**AUTH, **JSON, "Content-Length": str(limits.max_body_bytes * 64)}, b"{}", raw=True)
        yield BadRequest(f"content-length not a number {route}", "POST", route,
                         {**AUTH, **JSON, "Content-Length": "12abc"}, b"{}", raw=True)
        yield BadRequest(f"text/plain {route}", "POST", route, {**AUTH, "content-type": "text/plain"}, b"hello")
        yield BadRequest(f"form {route}", "POST", route,
                         {**AUTH, "content-type": "application/x-www-form-urlencoded"}, b"question=x")
    for payloads, route in ((_answer_payloads(limits), "/v1/answer"), (_chat_payloads(limits), "/v1/chat/completions")):
        for name, payload in payloads.items():
            yield from _both_ways(f"{name} {route}", route, {**AUTH, **JSON}, _json(payload))
    # The other route's payload on each route: wrong shape entirely.
    yield BadRequest("chat payload on /v1/answer", "POST", "/v1/answer", {**AUTH, **JSON}, _json(GOOD_CHAT))
    yield BadRequest("answer payload on chat", "POST", "/v1/chat/completions", {**AUTH, **JSON}, good)


@dataclass
class FloodResult:
    # "authenticated" / "unauthenticated" -> status -> count; status 0: no answer at all
    statuses: dict[str, Counter] = field(default_factory=lambda: {"authenticated": Counter(),
                                                                  "unauthenticated": Counter()})
    # 5xx, 2xx/3xx, no answer; a 401 to the right key; anything but a 401 to a guarded route without it
    failures: list[str] = field(default_factory=list)

    def sent(self, group: str | None = None) -> int:
        return sum(sum(counter.values()) for name, counter in self.statuses.items() if group in (None, name))

    @property
    def server_errors(self) -> int:
        return sum(count for counter in self.statuses.values() for status, count in counter.items() if status >= 500)

    def record(self, request: BadRequest, status: int) -> None:
        self.statuses[request.group][status] += 1
        if not 400 <= status < 500:
            self.failures.append(f"{request.name}: HTTP {status}")
        elif request.authenticated and status == 401:
            self.failures.append(f"{request.name}: 401 with the right key: its body was never checked")
        elif not request.authenticated and request.path != "/healthz" and status != 401:
            self.failures.append(f"{request.name}: HTTP {status} without the key, expected 401")


def _send_raw(base_url: str, request: BadRequest, timeout: float) -> int:
    """Write the request to a socket as given and read the status code of the answer."""
    url = httpx.URL(base_url)
    head = [f"{request.method} {request.path} HTTP/1.1", f"Host: {url.host}", "Connection: close",
            *(f"{k}: {v}" for k, v in request.headers.items())]
    with socket.create_connection((url.host, url.port), timeout=timeout) as sock:
        sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (request.body or b""))
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                raise httpx.RemoteProtocolError("connection closed without an answer")
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def _send(client: httpx.Client, request: BadRequest) -> int:
    if request.chunked:
        body = request.body
        content = (body[i:i + 65536] for i in range(0, len(body), 65536))
        return client.request(request.method, request.path, headers=request.headers, content=content).status_code
    return client.request(request.method, request.path, headers=request.headers, content=request.body).status_code


def flood(base_url: str, limits: ServeLimits = ServeLimits(), timeout: float = 60) -> FloodResult:
    """Send every bad request; each must be answered with a 4xx."""
    result = FloodResult()
    for request in bad_requests(limits):
        # A fresh connection each time: a refused body may leave the previous one closed.
        with httpx.Client(base_url=base_url, timeout=timeout) as client:
            try:
                status = _send_raw(base_url, request, timeout) if request.raw else _send(client, request)
            except (httpx.HTTPError, OSError, ValueError) as exc:
                result.failures.append(f"{request.name}: no answer ({type(exc).__name__}: {exc})")
                result.statuses[request.group][0] += 1
                continue
        result.record(request, status)
    return result


def still_answers(base_url: str, timeout: float = 120) -> bool:
    """The server's health, and a good answer and chat completion, after the flood."""
    with httpx.Client(base_url=base_url, timeout=timeout, headers=AUTH) as client:
        health = client.get("/healthz", headers={"Authorization": ""})
        answer = client.post("/v1/answer", json=GOOD_ANSWER)
        chat = client.post("/v1/chat/completions", json=GOOD_CHAT)
    return health.status_code == answer.status_code == chat.status_code == 200 and "model" in answer.json()


def flood_schema(number: int, max_bytes: int) -> dict:
    """A JSON Schema of its own (no cache holds it), as close to `max_bytes` as compact JSON as fits."""
    def schema(fields: int) -> dict:
        names = [f"field_{number}_{i}" for i in range(fields)]
        return {"type": "object", "required": names,
                "properties": {name: {"type": "string", "pattern": f"^[a-z]{{1,8}}-{number}$"} for name in names}}

    def size(fields: int) -> int:
        return len(json.dumps(schema(fields), separators=(",", ":")))

    low, high = 1, 2
    while size(high) <= max_bytes:
        low, high = high, high * 2
    while high - low > 1:  # the most fields that fit: size(low) <= max_bytes < size(high)
        middle = (low + high) // 2
        low, high = (middle, high) if size(middle) <= max_bytes else (low, middle)
    return schema(low)


@dataclass
class SchemaFlood:
    healthz_max_s: float  # the slowest /healthz answer while the schemas were being compiled
    healthz_answers: int
    statuses: Counter  # of the schema requests; 429: too many compilations at once, retry


def schema_flood(base_url: str, limits: ServeLimits = ServeLimits(), requests: int = 48, clients: int = 12,
                 timeout: float = 120) -> SchemaFlood:
    """`requests` distinct schemas of the largest size accepted, from `clients` clients at once, while
    /healthz (without the key) is asked every 50 ms."""
    schemas = [flood_schema(n, limits.max_schema_bytes - 16) for n in range(requests)]
    done, latencies = threading.Event(), []

    def watch() -> None:
        with httpx.Client(base_url=base_url, timeout=timeout) as client:
            while not done.is_set():
                started = time.monotonic()
                client.get("/healthz").raise_for_status()
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    def ask(schema: dict) -> int:
        body = {**GOOD_CHAT, "max_tokens": 1,
                "response_format": {"type": "json_schema", "json_schema": {"name": "flood", "schema": schema}}}
        with httpx.Client(base_url=base_url, timeout=timeout, headers=AUTH) as client:
            return client.post("/v1/chat/completions", json=body).status_code

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            statuses = Counter(pool.map(ask, schemas))
    finally:
        done.set()
        watcher.join(timeout=timeout)
    return SchemaFlood(max(latencies, default=float("inf")), len(latencies), statuses)
