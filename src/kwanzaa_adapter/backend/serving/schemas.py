"""What a request to the HTTP API may carry: the request models, the server's limits and options, and
the checks that turn an over-large request into a 4xx before any generation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kwanzaa_adapter.backend.serving.guard import rejection
from kwanzaa_adapter.data.records import Document, Message

if TYPE_CHECKING:  # the CLI reads ServeLimits' defaults without loading torch or FastAPI
    from kwanzaa_adapter.backend.models.causal_lm import CausalLMModel


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
    max_schema_bytes: int = 64 << 10  # a response_format's JSON Schema, as canonical JSON
    max_stop_chars: int = 1_000  # each stop sequence


@dataclass(frozen=True)
class ServeOptions:
    """How requests share the model: batching, the queue, shutdown, prompts."""

    max_batch_size: int = 8
    max_queue: int = 64
    queue_timeout_s: float = 60.0
    gather_ms: float = 5.0  # how long the first request of a batch waits for company
    shutdown_grace_s: float = 30.0
    default_system_prompt: bool = True  # the training system prompt for chat requests that bring none
    schema_workers: int = 2  # threads that compile clients' JSON Schemas, off the event loop
    max_schema_compilations: int = 8  # compiling or waiting for a thread; beyond: 429
    schema_cache_size: int = 64  # compiled schemas kept, by digest


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, description="The user's question.")
    documents: list[Document] = Field(default_factory=list, description="Retrieved documents, cited as [n].")
    max_new_tokens: int | None = Field(default=None, ge=1, description="Generation limit for this answer.")
    constrained: bool = Field(default=True, description="Contract-constrained decoding (valid JSON by "
                                                         "construction); false: the adapter's own output.")
    stream: bool = Field(default=False, description="Server-sent events: `delta` (text as generated), then "
                                                    "`answer` (the finished answer) or `error`.")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = "response"
    schema_: dict = Field(alias="schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(default=False, description="A last chunk, with empty choices, carries the usage.")


class ChatCompletionRequest(BaseModel):
    # Every other field is looked at by `check_openai_options`: accepted as a hint, or at the default of an
    # option this server does not implement, or refused (400) by name; never silently ignored.
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0, description="0 is greedy (the default here).")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(default=None, description="Up to 4 sequences; the answer ends before "
                                                                   "the first one it would contain.")
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1,
                             description="The sampler's random state: the same answer for the same seed.")
    documents: list[Document] | None = Field(default=None, description="Retrieved documents (extra_body): "
                                                                        "rendered into the last user turn.")
    response_format: ResponseFormat | None = None

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# OpenAI options this server does not implement. A client that does not use one leaves it out or sends
# null or its default (listed here) and is served; any other value is refused, naming the field.
UNSUPPORTED_OPTIONS: dict[str, tuple] = {
    "n": (1,), "logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none",),
    "functions": ([],), "function_call": ("none",), "presence_penalty": (0,), "frequency_penalty": (0,),
    "logit_bias": ({},), "modalities": (["text"],), "store": (False,), "audio": (), "prediction": (),
    "reasoning_effort": (), "verbosity": (), "web_search_options": (),
}
# Fields that change nothing in the answer (who asks, tracing, caching and routing hints): accepted as sent.
HINTS = frozenset({"user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
                   "parallel_tool_calls"})


def _is_default(value: Any, defaults: tuple) -> bool:
    return value is None or any(isinstance(value, bool) == isinstance(default, bool) and value == default
                                for default in defaults)


def check_openai_options(request: ChatCompletionRequest, limits: ServeLimits) -> None:
    for name, value in (request.model_extra or {}).items():
        if name in UNSUPPORTED_OPTIONS:
            if not _is_default(value, UNSUPPORTED_OPTIONS[name]):
                accepted = " or ".join(["null", *(json.dumps(d) for d in UNSUPPORTED_OPTIONS[name])])
                raise rejection(400, f"{name}: not supported by this server (accepted: {accepted}); leave it out")
        elif name not in HINTS:
            raise rejection(400, f"{name}: not a parameter of /v1/chat/completions on this server")
    if request.stream_options is not None and not request.stream:
        raise rejection(400, "stream_options: only allowed when stream is true")
    stops = request.stop_sequences
    if len(stops) > 4:
        raise rejection(422, f"stop: {len(stops)} sequences given, at most 4")
    for number, stop in enumerate(stops):
        if not stop or len(stop) > limits.max_stop_chars:
            raise rejection(422, f"stop[{number}]: {len(stop)} characters, from 1 to {limits.max_stop_chars}")


def generation_limit(asked: int | None, model: CausalLMModel, limits: ServeLimits, field: str) -> int:
    if asked is not None and asked > limits.max_new_tokens:
        raise rejection(422, f"{field}: {asked} exceeds this server's limit of {limits.max_new_tokens}")
    return asked or min(model.config.evaluation.max_new_tokens, limits.max_new_tokens)


def check_documents(documents: list[Document], limits: ServeLimits) -> None:
    if len(documents) > limits.max_documents:
        raise rejection(413, f"documents: {len(documents)} given, at most {limits.max_documents}")
    for number, document in enumerate(documents, start=1):
        if len(document.text) > limits.max_document_chars:
            raise rejection(413, f"documents[{number}].text: {len(document.text)} characters, "
                               f"at most {limits.max_document_chars}")


def check_answer_request(request: AnswerRequest, limits: ServeLimits) -> None:
    if len(request.question) > limits.max_question_chars:
        raise rejection(413, f"question: {len(request.question)} characters, at most {limits.max_question_chars}")
    check_documents(request.documents, limits)


def check_chat_request(request: ChatCompletionRequest, limits: ServeLimits) -> None:
    if len(request.messages) > limits.max_messages:
        raise rejection(413, f"messages: {len(request.messages)} given, at most {limits.max_messages}")
    total = sum(len(m.content) for m in request.messages)
    if total > limits.max_message_chars:
        raise rejection(413, f"messages: {total} characters in all, at most {limits.max_message_chars}")
    check_documents(request.documents or [], limits)
    check_openai_options(request, limits)
