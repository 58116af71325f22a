"""HTTP API over one loaded model: contract answers, OpenAI-compatible chat, health, metrics.

- `POST /v1/answer`: {question, documents} -> {answer (kwanzaa.answer.v1) | error with raw output}
- `POST /v1/chat/completions`: OpenAI chat completions, non-streaming and streaming (SSE). The
  training system prompt is applied when the request brings none; retrieved `documents` beside
  `messages` (the OpenAI client's `extra_body`) are rendered into the last user turn with the
  training template; `response_format` (`json_object`, `json_schema`) is honoured by constrained
  decoding, the client's schema compiled off the event loop (`schema_cache`: at most 64 KiB, llguidance's
  parser limits, a few compilations at once, then 429; cached by digest). `stop` (OpenAI semantics:
  the answer ends before the sequence, finish_reason "stop"), `seed` (a sampled answer's own random
  state: the same alone or in a batch, on either engine) and `stream_options.include_usage` (a last
  chunk with the usage) are honoured; an option it does not implement (logprobs, tools, penalties,
  logit_bias, n > 1, ...) or an unknown field is refused with 400 naming it unless at its default.
- `GET /healthz`: without the key, only alive and ready (503 once shutting down); with it (or with no
  key configured), also base model and digest, adapter path and verification, queue and requests in flight
- `GET /metrics`: Prometheus text format (needs the key)

Concurrent requests are generated together (`batching`): up to `--max-batch-size` per batch; at
most `--max-queue` wait (then 429 with Retry-After), none longer than `--queue-timeout` (then 503).
A client that goes away is dropped from its batch. On SIGTERM the server stops accepting, lets
what is in flight finish within the grace period, ends the rest with an error event, and exits 0.

Every error is a JSON `{"error": {"type", "message"}}`; bad requests get a 4xx and the server
stays up. When `KWANZAA_ADAPTER_API_KEY` is set, every route but /healthz needs
`Authorization: Bearer <key>`, and /healthz tells its details only to those who send it. Bodies,
documents, text lengths and generation lengths are bounded (`ServeLimits`).
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

from kwanzaa_adapter.backend.serving.schemas import ServeLimits, ServeOptions

if TYPE_CHECKING:  # the CLI checks the serve extra without loading torch or FastAPI
    from fastapi import FastAPI

    from kwanzaa_adapter.backend.models.causal_lm import CausalLMModel

SERVE_EXTRA_MISSING = "the HTTP server needs the serve extra: pip install 'kwanzaa-adapter[serve]'"

API_KEY_ENV = "KWANZAA_ADAPTER_API_KEY"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def create_app(model: CausalLMModel, limits: ServeLimits = ServeLimits(), api_key: str | None = None,
               options: ServeOptions = ServeOptions()) -> FastAPI:
    """The FastAPI app over `model` (`app`). `api_key` None: the server is open (bind it to loopback).

    `app.state.batcher` is the request batcher; whoever runs the app closes it (`serve` does).
    """
    from kwanzaa_adapter.backend.serving.app import build_app

    return build_app(model, limits, api_key, options)


def api_key_from_environment() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def serve(model: CausalLMModel, host: str = "127.0.0.1", port: int = 8000, limits: ServeLimits = ServeLimits(),
          api_key: str | None = None, options: ServeOptions = ServeOptions()) -> None:
    """Run the API with uvicorn until SIGINT or SIGTERM; then drain within the grace period and return."""
    import uvicorn

    app = create_app(model, limits, api_key, options)
    batcher = app.state.batcher

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            batcher.begin_close(options.shutdown_grace_s)  # no new requests; those taken have the grace
            super().handle_exit(sig, frame)
            # uvicorn re-raises a captured signal once it has shut down, so the process would end "killed
            # by SIGTERM"; a drained shutdown is a clean exit (0).
            if sig == signal.SIGTERM and sig in getattr(self, "_captured_signals", []):
                self._captured_signals.remove(sig)

    # uvicorn waits for open connections a little longer than the batcher's grace: their error events go out.
    config = uvicorn.Config(app, host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=options.shutdown_grace_s + 5)
    Server(config).run()
    batcher.close(0)
    app.state.grammars.close()


def serve_extra_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "prometheus_client"))
