"""The backend as its users call it: the real `openai` client with documents and a JSON Schema,
the training prompt applied, batching over HTTP, a bounded queue (429, 503), /metrics, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from helpers import DOCUMENT, inside_grammar, running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits, ServeOptions
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, answer_json_schema
from tiny_artifact import tiny_artifact  # noqa: F401

CONTRACT = {"type": "json_schema", "json_schema": {"name": "kwanzaa.answer.v1", "schema": answer_json_schema()}}


@pytest.fixture(scope="module")
def model(tiny_artifact):
    config, artifact = tiny_artifact
    return model_from_config(load_training_config(config, ("evaluation.max_new_tokens=8",)), adapter=artifact)


@pytest.fixture
def prompts(model, monkeypatch):
    """The chat turns the model is asked to continue, as the server rendered them."""
    seen, encode = [], model.encode

    def recording(messages, max_new_tokens):
        seen.append(list(messages))
        return encode(messages, max_new_tokens)

    monkeypatch.setattr(model, "encode", recording)
    return seen


def test_the_openai_client_gets_the_training_prompt_and_a_contract_shaped_answer(model, prompts):
    with running(create_app(model)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "When is Kwanzaa?"}], max_tokens=12,
            extra_body={"documents": [DOCUMENT]}, response_format=CONTRACT)
        streamed = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "When is Kwanzaa?"}], max_tokens=12,
            extra_body={"documents": [DOCUMENT]}, response_format=CONTRACT, stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in streamed]
    system, user = prompts[0]
    assert system == {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}  # the request brought none
    assert user["content"].startswith("Documents:\n[1] Kwanzaa\n") and user["content"].endswith("Question: When is Kwanzaa?")
    content = reply.choices[0].message.content
    assert content.startswith('{"version":"kwanzaa.answer.v1')  # a random tiny model, held to the schema
    ids = model.tokenizer(content, add_special_tokens=False)["input_ids"]
    assert inside_grammar(model.contract_grammar, ids)
    assert "".join(pieces) == content and reply.usage.completion_tokens == 12
    assert prompts[1] == prompts[0]  # streaming renders the same prompt


def test_a_system_prompt_of_the_request_is_kept_and_the_default_can_be_turned_off(model, prompts):
    options = ServeOptions(default_system_prompt=False)
    with running(create_app(model, options=options)) as url:
        for messages in ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         [{"role": "user", "content": "Hi"}]):
            response = httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, "max_tokens": 2},
                                  timeout=60)
            assert response.status_code == 200
    assert prompts == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                       [{"role": "user", "content": "Hi"}]]


def test_a_schema_that_does_not_compile_and_documents_without_a_question_are_422(model):
    with running(create_app(model)) as url:
        bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}
        for body in ({"messages": [{"role": "user", "content": "Hi"}], "response_format": bad_schema},
                     {"messages": [{"role": "system", "content": "Hi"}], "documents": [DOCUMENT]}):
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 422, response.text


def test_a_client_schema_compiles_once_per_digest_in_a_compile_thread_and_is_bounded(model, monkeypatch):
    from kwanzaa_adapter.backend.serving import schema_cache

    compiled, compile_ = [], schema_cache.SchemaGrammar

    def counting(*args):  # the compilation, and the thread it runs in
        compiled.append(threading.current_thread().name)
        return compile_(*args)

    monkeypatch.setattr(schema_cache, "SchemaGrammar", counting)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    respelled = json.loads(json.dumps({"properties": {"b": {"type": "string"}, "a": {"type": "integer"}},
                                       "type": "object"}, indent=2))  # the same schema, keys in another order
    too_large = {"type": "object", "description": "x" * ServeLimits().max_schema_bytes}
    with running(create_app(model)) as url:
        def ask(schema: dict) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})

        statuses = [ask(schema).status_code, ask(respelled).status_code]
        refused = ask(too_large)
    assert statuses == [200, 200] and len(compiled) == 1 and compiled[0].startswith("schema-compile")
    assert refused.status_code == 413
    assert refused.json()["error"]["message"].startswith("response_format.json_schema.schema: ")


def test_compilations_beyond_the_bound_get_429_while_healthz_and_the_same_schema_wait_for_none(model, monkeypatch):
    """One compilation held in its thread: /healthz answers at once, a second client with the same schema waits
    for that compilation (not a second one), a distinct schema beyond `max_schema_compilations` gets 429."""
    from kwanzaa_adapter.backend.serving import schema_cache

    release, compiled, compile_ = threading.Event(), [], schema_cache.SchemaGrammar

    def held(*args):
        compiled.append(args[1])
        assert release.wait(timeout=10)
        return compile_(*args)

    monkeypatch.setattr(schema_cache, "SchemaGrammar", held)
    first, other = ({"type": "object", "properties": {name: {"type": "integer"}}} for name in ("a", "b"))
    with running(create_app(model, options=ServeOptions(max_schema_compilations=1))) as url, \
            ThreadPoolExecutor(max_workers=2) as pool:
        def ask(schema: dict) -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})

        waiting = [pool.submit(ask, first), pool.submit(ask, first)]
        while not compiled:
            time.sleep(0.01)
        started = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200 and time.monotonic() - started < 1
        busy = ask(other)
        release.set()
        statuses = [future.result().status_code for future in waiting]
    assert busy.status_code == 429 and busy.json()["error"]["type"] == "schemas_busy" and busy.headers["Retry-After"]
    assert statuses == [200, 200] and compiled == [first]


def slowed(model, monkeypatch, seconds: float) -> dict:
    generate, calls = model.model.generate, {"sizes": []}

    def slow(*args, **kwargs):
        calls["sizes"].append(kwargs["input_ids"].shape[0])
        time.sleep(seconds)
        return generate(*args, **kwargs)

    monkeypatch.setattr(model.model, "generate", slow)
    return calls


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(model, monkeypatch):
    calls = slowed(model, monkeypatch, 0.3)
    questions = [f"Question number {n}, {'with more words ' * n}?" for n in range(6)]
    with running(create_app(model, options=ServeOptions(max_batch_size=8))) as url:
        def ask(question):
            body = {"question": question, "documents": [DOCUMENT], "max_new_tokens": 3 + len(question) % 4}
            return httpx.post(f"{url}/v1/answer", json=body, timeout=60).json()

        with ThreadPoolExecutor(max_workers=6) as pool:
            batched = list(pool.map(ask, questions))
        alone = [ask(question) for question in questions]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert max(calls["sizes"]) > 1  # some were generated together
    assert batched == alone  # greedy: each its own answer, the same as one at a time
    assert 'kwanzaa_adapter_requests_total{route="/v1/answer",status="200"} 12.0' in metrics
    assert "kwanzaa_adapter_batch_size_bucket" in metrics and "kwanzaa_adapter_queue_depth 0.0" in metrics


def test_a_full_queue_answers_429_then_a_stale_request_503_and_the_server_answers_afterwards(model, monkeypatch):
    slowed(model, monkeypatch, 1.0)
    options = ServeOptions(max_batch_size=1, max_queue=1, queue_timeout_s=0.5)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    with running(create_app(model, options=options)) as url:
        with ThreadPoolExecutor(max_workers=3) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
            time.sleep(0.3)  # the first is generating; the second waits; the third finds the queue full
            second = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=60)
            time.sleep(0.2)
            health = httpx.get(f"{url}/healthz", timeout=10).json()["queue"]
            third = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            statuses = [first.result().status_code, second.result().status_code]
        after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert health == {"depth": 1, "in_flight": 1, "max_batch_size": 1, "max_queue": 1}
    assert third.status_code == 429 and int(third.headers["retry-after"]) >= 1
    assert third.json()["error"]["type"] == "queue_full"
    assert statuses == [200, 503]  # the second waited longer than the queue timeout
    assert after.status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_what_is_in_flight_and_exits_0(tiny_artifact, tmp_path):
    config, artifact = tiny_artifact
    port = free_port()
    command = [sys.executable, "-m", "kwanzaa_adapter.cli", "serve", "--config", str(config), "--adapter",
               str(artifact), "--port", str(port), "--shutdown-grace", "1", "--max-new-tokens", "1500", "--gather-ms", "300"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=2)
            break
        except httpx.TransportError:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
            time.sleep(0.5)
    events, short = [], {}
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1500, "stream": True}

    def stream_long() -> None:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            events.extend(line for line in response.iter_lines() if line.startswith("data: "))

    def ask_short() -> None:  # in the long one's batch (gathered within 300 ms), done long before SIGTERM
        short["status"] = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                                     json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).status_code

    threads = [threading.Thread(target=stream_long), threading.Thread(target=ask_short)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    server.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"{url}/healthz", timeout=5)
    for thread in threads:
        thread.join(timeout=60)
    code = server.wait(timeout=60)
    output = server.stdout.read()
    assert code == 0, output
    assert short["status"] == 200
    last = json.loads(events[-1].removeprefix("data: ")) if events[-1] != "data: [DONE]" else {"done": True}
    # The long answer either completed or was ended, after the grace period, by an error event.
    assert last.get("done") or last["error"]["type"] == "shutting_down", events[-3:]
    assert len(events) > 2


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_is_dropped_from_its_batch(model, stream):
    body = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1500, "stream": stream}
    limits = ServeLimits(max_new_tokens=1500)
    with running(create_app(model, limits)) as url:
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                received = [next(lines) for _ in range(6)]  # a few events, then the client hangs up
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and closes the connection
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
            received = ["data: (none: not streaming)"]
        started = time.monotonic()
        while httpx.get(f"{url}/healthz", timeout=10).json()["queue"]["in_flight"]:
            assert time.monotonic() - started < 3, "the abandoned answer is still being generated"
            time.sleep(0.1)
        tokens = httpx.get(f"{url}/metrics", timeout=10).text
    generated = float(next(line for line in tokens.splitlines()
                           if line.startswith("kwanzaa_adapter_generated_tokens_total")).split()[-1])
    assert any(line.startswith("data: ") for line in received) and generated < 1500


def test_documents_of_a_chat_request_are_bounded_like_those_of_an_answer(model):
    too_many = [DOCUMENT] * (ServeLimits().max_documents + 1)
    with running(create_app(model)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                              json={"messages": [{"role": "user", "content": "Hi"}], "documents": too_many})
    assert response.status_code == 413 and "documents: 21 given, at most 20" in response.json()["error"]["message"]
