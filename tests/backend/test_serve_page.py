"""`GET /`, the page to try the adapter, over HTTP: open without the key and never holding it, a policy that
allows nothing external; and the streamed /v1/answer it reads."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import httpx
import pytest

from helpers import DOCUMENT, running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.page import content_security_policy
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from tiny_artifact import tiny_artifact  # noqa: F401

KEY = "page-key-123"
LIMITS = ServeLimits(max_documents=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def keyed(tiny_artifact):
    config, artifact = tiny_artifact
    model = model_from_config(load_training_config(config, ("evaluation.max_new_tokens=6",)), adapter=artifact)
    with running(create_app(model, LIMITS, api_key=KEY)) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client


def sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_open_self_contained_and_never_holds_the_key(keyed):
    response = keyed.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert KEY not in page
    assert '<meta name="kwanzaa-key-required" content="true">' in page
    assert '<meta name="kwanzaa-max-documents" content="2">' in page
    # nothing fetched from elsewhere: no external URL, no src or stylesheet link of any kind
    assert not re.search(r"https?://", page) and " src=" not in page and "<link" not in page
    policy = response.headers["content-security-policy"]
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert policy == (f"default-src 'none'; script-src {sha256_source(script)}; style-src {sha256_source(style)}; "
                      "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; "
                      "frame-ancestors 'none'")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert keyed.post("/v1/answer", json={"question": "q", "documents": [DOCUMENT]}).status_code == 401
    assert keyed.post("/", json={}).status_code == 401  # only GET (and HEAD) of the page are open


def test_a_policy_lists_no_hash_for_what_a_page_does_not_have():
    assert "script-src 'none'; style-src 'none'" in content_security_policy("<p>nothing inline</p>")


def test_a_streamed_answer_is_deltas_then_the_finished_answer(keyed):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"question": "When is Kwanzaa?", "documents": [DOCUMENT], "stream": True}
    with keyed.stream("POST", "/v1/answer", json=body, headers=headers) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        blocks = [block for block in response.read().decode().split("\n\n") if block]
    events = [(re.match(r"event: (\w+)\n", block).group(1), json.loads(block.split("data: ", 1)[1]))
              for block in blocks]
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "answer" and set(kinds[:-1]) == {"delta"} and len(kinds) >= 2
    final = events[-1][1]
    assert set(final) >= {"model", "answer", "error", "usage", "seconds"} and final["seconds"] > 0
    text = "".join(data["text"] for kind, data in events if kind == "delta")
    assert final["usage"]["completion_tokens"] <= 6
    if final["answer"] is None:  # the tiny model's 6 tokens: the raw output is the streamed text
        assert final["error"]["raw_output"] == text
    unstreamed = keyed.post("/v1/answer", json={**body, "stream": False}, headers=headers).json()
    assert unstreamed["answer"] == final["answer"] and unstreamed["error"] == final["error"]


def test_a_streamed_request_over_a_limit_is_an_error_status_not_a_stream(keyed):
    response = keyed.post("/v1/answer", json={"question": "q", "documents": [DOCUMENT] * 3, "stream": True},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 413 and "documents" in response.json()["error"]["message"]
