"""Clients' JSON Schemas (`response_format`) as grammars: compiled off the event loop, bounded, cached.

A schema is read as canonical JSON (sorted keys, compact) and known by that text's SHA-256: the same
schema however it is spelled compiles once, and stays in a cache of the last `schema_cache_size`.
A new one is refused beyond `max_schema_bytes` (413), then compiled in a thread of a pool of its own
(`schema_workers`), so that neither the event loop (every other request, /healthz included) nor the
threads that run the other routes wait for it. The work of one compilation is bounded by llguidance's
own parser limits (`CLIENT_SCHEMA_LIMITS`; a thread cannot be stopped from outside), and the number of
compilations by `max_schema_compilations`: beyond it a request gets 429 with Retry-After. Clients that
send a schema being compiled wait for that one compilation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kwanzaa_adapter.backend.serving.guard import rejection
from kwanzaa_adapter.backend.serving.schemas import ResponseFormat, ServeLimits, ServeOptions
from kwanzaa_adapter.generation.grammar import CLIENT_SCHEMA_LIMITS, SchemaGrammar

FIELD = "response_format.json_schema.schema"


class SchemasBusy(Exception):
    """Too many schemas are being compiled; the client should retry (HTTP 429)."""


class SchemaCache:
    """The contract's grammar, and clients' schemas compiled on demand (see the module)."""

    def __init__(self, model, limits: ServeLimits, options: ServeOptions):
        self.model, self.max_bytes = model, limits.max_schema_bytes
        self.size, self.max_compilations = options.schema_cache_size, options.max_schema_compilations
        self.compiled: OrderedDict[str, SchemaGrammar] = OrderedDict()
        self.compiling: dict[str, asyncio.Future] = {}
        self.pool = ThreadPoolExecutor(max_workers=options.schema_workers, thread_name_prefix="schema-compile")

    def contract(self):
        return self.model.contract_grammar.constraint()

    async def for_format(self, response_format: ResponseFormat | None):
        """A fresh constraint for the request's response_format (None: free text)."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            schema: dict[str, Any] = {"type": "object"}
        elif response_format.json_schema is None:
            raise rejection(422, "response_format.json_schema: required when type is json_schema")
        else:
            schema = response_format.json_schema.schema_
        try:
            text = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        except (ValueError, RecursionError):
            raise rejection(422, f"{FIELD}: nested too deeply") from None
        if len(text) > self.max_bytes:
            raise rejection(413, f"{FIELD}: {len(text)} bytes as compact JSON, at most {self.max_bytes}")
        digest = hashlib.sha256(text).hexdigest()
        grammar = self.compiled.get(digest)
        if grammar is None:
            grammar = await self._compile(digest, schema)
        else:
            self.compiled.move_to_end(digest)
        return grammar.constraint()

    async def _compile(self, digest: str, schema: dict) -> SchemaGrammar:
        future = self.compiling.get(digest)
        if future is None:
            if len(self.compiling) >= self.max_compilations:
                raise SchemasBusy(f"{len(self.compiling)} JSON Schemas are being compiled already; retry in 1 s")
            future = asyncio.get_running_loop().run_in_executor(
                self.pool, SchemaGrammar, self.model.tokenizer, schema, CLIENT_SCHEMA_LIMITS)
            self.compiling[digest] = future
            future.add_done_callback(lambda done: self._compiled(digest, done))
        try:
            return await asyncio.shield(future)  # a client that goes away leaves it to the others who wait
        except (ValueError, RecursionError) as exc:
            raise rejection(422, f"{FIELD}: {exc}") from None

    def _compiled(self, digest: str, future: asyncio.Future) -> None:
        del self.compiling[digest]
        if not future.cancelled() and future.exception() is None:
            self.compiled[digest] = future.result()
            while len(self.compiled) > self.size:
                self.compiled.popitem(last=False)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
