"""The HTTP API on loopback, spoken to with a real HTTP client: answers, OpenAI chat, limits, API key."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers import DOCUMENT, running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from tiny_artifact import tiny_artifact  # noqa: F401

LIMITS = ServeLimits(max_body_bytes=4096, max_documents=2, max_question_chars=200, max_document_chars=500,
                     max_messages=4, max_message_chars=1000, max_new_tokens=8)
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def model(tiny_artifact):
    config, artifact = tiny_artifact
    return model_from_config(load_training_config(config, ("evaluation.max_new_tokens=4",)), adapter=artifact)


@pytest.fixture(scope="module")
def server(model):
    with running(create_app(model, LIMITS)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def keyed(model):
    with running(create_app(model, LIMITS, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def test_healthz_reports_base_model_adapter_version_and_verification(server):
    response = server.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model"] == "tiny-v0.1.0" and body["family"] == "causal_lm"
    assert "tiny-llama" in body["base_model"] and len(body["base_digest"]) == 64
    adapter = body["adapter"]
    assert adapter["version"] == "0.1.0" and adapter["verified"] is True
    assert adapter["verification"].startswith("OK ") and adapter["base_digest_matches"] is True


def test_answer_returns_the_contract_answer_or_an_error_with_raw_output(server):
    response = server.post("/v1/answer", json={"question": "When is Kwanzaa?", "documents": [DOCUMENT]})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny-v0.1.0" and set(body) == {"model", "answer", "error"}
    if body["answer"] is None:  # a tiny random model rarely writes the contract
        assert body["error"]["type"] == "invalid_output" and isinstance(body["error"]["raw_output"], str)
    else:
        assert body["answer"]["version"] == "kwanzaa.answer.v1"


def test_chat_completion_is_openai_shaped(server):
    response = server.post("/v1/chat/completions", json={
        "model": "anything", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "user": "x"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 5 and usage["total_tokens"] == usage["prompt_tokens"] + usage[
        "completion_tokens"]


def test_streamed_chat_completion_is_server_sent_events_ending_in_done(server):
    messages = [{"role": "user", "content": "Hello"}]
    whole = server.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6}).json()
    with server.stream("POST", "/v1/chat/completions",
                       json={"messages": messages, "max_tokens": 6, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]  # greedy: the same reply either way


@pytest.mark.parametrize("path, payload, status, fragment", [
    ("/v1/answer", {"documents": [DOCUMENT]}, 422, "question: Field required"),
    ("/v1/answer", {"question": "q", "documents": [{"title": "t"}]}, 422, "documents.0.text"),
    ("/v1/answer", {"question": "q", "extra": 1}, 422, "extra: Extra inputs are not permitted"),
    ("/v1/answer", {"question": "q", "documents": [DOCUMENT] * 3}, 413, "documents: 3 given, at most 2"),
    ("/v1/answer", {"question": "q" * 201}, 413, "question: 201 characters, at most 200"),
    ("/v1/answer", {"question": "q", "documents": [{"title": "t", "text": "x" * 501}]}, 413, "documents[1].text"),
    ("/v1/answer", {"question": "q", "max_new_tokens": 9}, 422, "exceeds this server's limit of 8"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}, 422,
     "max_tokens: 100 exceeds"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n: not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 5}, 413, "messages: 5 given"),
])
def test_bad_requests_get_4xx_json_errors(server, path, payload, status, fragment):
    response = server.post(path, json=payload)
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]


def test_prompt_beyond_the_context_window_gets_413(model):
    window = model.model.config.max_position_embeddings
    roomy = ServeLimits(max_body_bytes=1 << 20, max_messages=8, max_message_chars=100_000, max_new_tokens=8)
    long_chat = {"messages": [{"role": "user", "content": "Kwanzaa " * 600}] * 8}
    with running(create_app(model, roomy)) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=long_chat, timeout=60)
        assert response.status_code == 413
        assert f"context window is {window} tokens" in response.json()["error"]["message"]
        assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200


def test_malformed_and_oversized_bodies_get_4xx_and_the_server_stays_up(server):
    cases = [
        (server.post("/v1/answer", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (server.post("/v1/answer", content=b"[1, 2]", headers={"content-type": "application/json"}), 422),
        (server.post("/v1/answer", content=b"x" * 5000, headers={"content-type": "application/json"}), 413),
        (server.post("/v1/answer", content=(b"y" * 3000 for _ in range(3)),
                     headers={"content-type": "application/json"}), 413),  # chunked: no Content-Length
        (server.get("/v1/answer"), 405),
        (server.get("/nowhere"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json" and response.json()["error"]["message"]
    assert server.get("/healthz").status_code == 200


def test_api_key_guards_every_route_but_healthz(keyed):
    assert keyed.get("/healthz").status_code == 200
    question = {"question": "When?", "documents": [DOCUMENT], "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"X-Api-Key": KEY}):
        response = keyed.post("/v1/answer", json=question, headers=headers)
        assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/openapi.json").status_code == 401
    response = keyed.post("/v1/answer", json=question, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200


def test_healthz_without_the_key_says_only_alive_and_ready(keyed, model):
    response = keyed.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok", "ready": True}
    secrets = [model.base_digest, model.adapter.path, model.adapter.trained_base_digest, "verification", "queue"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        assert not [s for s in secrets if s in keyed.get("/healthz", headers=headers).text]
    details = keyed.get("/healthz", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert details["base_digest"] == model.base_digest and details["adapter"]["path"] == model.adapter.path
    assert details["adapter"]["verified"] is True and details["queue"]["max_queue"] >= 1 and details["ready"]


def test_metrics_need_the_key(keyed):
    response = keyed.get("/metrics")
    assert response.status_code == 401 and response.json()["error"]["type"] == "unauthorized"
    response = keyed.get("/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200 and "kwanzaa_adapter_queue_depth" in response.text


def test_concurrent_requests_share_one_generation_and_never_overlap(server, model, monkeypatch):
    generate, guard = model.model.generate, threading.Lock()
    count = {"calls": 0, "in_flight": 0, "most": 0}

    def counted(*args, **kwargs):  # the model's generation, counting how many run at once
        with guard:
            count["calls"] += 1
            count["in_flight"] += 1
            count["most"] = max(count["most"], count["in_flight"])
        try:
            time.sleep(0.2)  # long enough for another request's generation to overlap, were it let in
            return generate(*args, **kwargs)
        finally:
            with guard:
                count["in_flight"] -= 1

    monkeypatch.setattr(model.model, "generate", counted)
    payload = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    together = threading.Barrier(3)

    def ask(_):  # a client per thread, all sending at once
        with httpx.Client(base_url=server.base_url, timeout=120) as client:
            together.wait(timeout=60)
            return client.post("/v1/chat/completions", json=payload)

    with ThreadPoolExecutor(max_workers=3) as pool:
        responses = list(pool.map(ask, range(3)))  # a thread's exception is raised here
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert len({r.json()["choices"][0]["message"]["content"] for r in responses}) == 1  # greedy: one reply
    # Arriving together, they were generated in batches, never two generations at once.
    # (A request that missed the first batch waits out its 0.2 s and joins the next: two calls at most.)
    assert count["calls"] <= 2 and count["most"] == 1
    assert not model.lock.locked()


def test_serve_binds_loopback_by_default():
    from kwanzaa_adapter.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--config", "c.yaml"])
    assert args.host == "127.0.0.1" and args.max_new_tokens == ServeLimits().max_new_tokens
