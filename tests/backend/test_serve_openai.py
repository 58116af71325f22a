"""The OpenAI route's options, on both engines the server runs (the reference and llama.cpp): `stop`
ends the answer before the sequence, `seed` gives the same sampled answer alone or in a batch,
`stream_options.include_usage` ends the stream with the usage; options it does not implement are
refused by name unless at their default."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers import running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeOptions
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from tiny_artifact import tiny_artifact  # noqa: F401

CHAT = {"messages": [{"role": "user", "content": "Tell me about Kwanzaa."}], "max_tokens": 16}
ENGINES = ["reference", "llama.cpp"]


@pytest.fixture(scope="module", params=ENGINES)
def served(request, tiny_artifact, tmp_path_factory):  # noqa: F811
    """(model, base URL, batch sizes seen) of a server on each engine; concurrent requests gather 300 ms."""
    if request.param == "llama.cpp":
        pytest.importorskip("llama_cpp", reason="the llama.cpp engine is built by `make setup`")
    config, artifact = tiny_artifact
    cache = tmp_path_factory.mktemp("openai-options-cache")
    model = model_from_config(load_training_config(config, (
        f"inference.engine={request.param}", "inference.quant=f16", f"inference.cache_dir={cache}")), adapter=artifact)
    assert (model.fast is None) == (request.param == "reference")
    app = create_app(model, options=ServeOptions(gather_ms=300))
    sizes, batch_done = [], app.state.batcher.on_batch
    app.state.batcher.on_batch = lambda tickets, seconds: (sizes.append(len(tickets)), batch_done(tickets, seconds))
    with running(app) as url:
        yield model, url, sizes


@pytest.fixture(scope="module")
def checked(tiny_artifact):  # noqa: F811
    """A server on the reference engine, for what is checked before any engine sees the request."""
    config, artifact = tiny_artifact
    model = model_from_config(load_training_config(config, ("evaluation.max_new_tokens=4",)), adapter=artifact)
    with running(create_app(model)) as url:
        yield url


def chat(url: str, **fields) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(url: str, **fields) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**CHAT, **fields, "stream": True},
                      timeout=120) as response:
        assert response.status_code == 200
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


def content(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


def test_stop_ends_the_answer_before_the_stop_sequence(served):
    _, url, _ = served
    whole = chat(url)["choices"][0]["message"]["content"]
    start = next(p for p in range(len(whole) // 2, len(whole) - 1) if whole.find(whole[p:p + 2]) > 0)
    stop = whole[start:start + 2]
    cut = whole.find(stop)  # its first occurrence: the answer ends just before it
    for given in ([f"never{chr(1)}", stop], stop):
        reply = chat(url, stop=given)["choices"][0]
        assert reply["message"]["content"] == whole[:cut] and reply["finish_reason"] == "stop"
    chunks = streamed(url, stop=[stop])
    assert content(chunks) == whole[:cut] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_held_back_tail_that_begins_no_stop_sequence_is_sent_in_the_end(served):
    _, url, _ = served
    reply = chat(url)["choices"][0]
    stop = reply["message"]["content"][-1] + chr(1)  # the answer's last character begins it: held, then sent
    for text in (chat(url, stop=stop)["choices"][0]["message"]["content"], content(streamed(url, stop=stop))):
        assert text == reply["message"]["content"]


def test_a_seeded_answer_is_the_same_alone_and_in_a_batch(served):
    _, url, sizes = served
    seeded = {"temperature": 1.0, "seed": 1234}
    alone = [chat(url, **seeded)["choices"][0]["message"]["content"] for _ in range(2)]
    assert alone[0] == alone[1] and alone[0]
    others = [{"temperature": 1.0, "seed": 7}, {"temperature": 1.0}, {"temperature": 0.7, "seed": 1234,
              "messages": [{"role": "user", "content": "Who celebrates it?"}]}, {}]
    together = threading.Barrier(1 + len(others))
    sizes.clear()

    def ask(fields: dict) -> str:
        together.wait(timeout=60)
        return chat(url, **fields)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=1 + len(others)) as pool:
        answers = list(pool.map(ask, [seeded, *others]))
    assert max(sizes) > 1  # generated in one batch with the others
    assert answers[0] == alone[0]
    assert answers[1] != alone[0]  # another seed, another answer


def test_include_usage_ends_the_stream_with_the_usage_in_openai_form(served):
    _, url, _ = served
    usage = chat(url)["usage"]
    chunks = streamed(url, stream_options={"include_usage": True})
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == usage
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-2]["choices"][0]["finish_reason"]
    assert all("usage" not in c for c in streamed(url))  # not asked for: not sent
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=16, stream=True,
                                            stream_options={"include_usage": True})
    assert [c.usage for c in stream][-1].completion_tokens == usage["completion_tokens"]


@pytest.mark.parametrize("field, value", [
    ("logprobs", True), ("top_logprobs", 2), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"42": -100}), ("n", 2),
    ("store", True), ("audio", {"voice": "alloy"}), ("top_k", 5), ("repetition_penalty", 1.1),
])
def test_an_option_the_server_does_not_implement_is_refused_by_name(checked, field, value):
    response = httpx.post(f"{checked}/v1/chat/completions", json={**CHAT, field: value}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(f"{field}: ")


def test_unimplemented_options_at_their_defaults_and_hints_are_accepted(checked):
    url = checked
    defaults = {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": None, "functions": None,
                "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "n": 1, "store": False,
                "user": "someone", "metadata": {"k": "v"}, "parallel_tool_calls": True, "service_tier": "auto"}
    assert chat(url, **defaults)["choices"][0]["message"]["content"] == chat(url)["choices"][0]["message"]["content"]
    response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "stream_options": {"include_usage": True}},
                          timeout=60)
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("stream_options: ")
