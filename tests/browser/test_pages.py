"""The run report and the serving page in a real browser (headless Chromium): they open with no request outside
their origin, show every section, render an answer with its sources, and put bad input on the page."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch

from chromium import (DOCUMENTS, QUESTION, SECTIONS, ask, fill_documents, launched, outside, requests_of, screenshot,
                      unavailable)
from conftest import build_tiny_model, write_run_config
from helpers import running
from kwanzaa_adapter.backend.models import model_from_config
from kwanzaa_adapter.backend.serving.schemas import ServeLimits
from kwanzaa_adapter.backend.serving.server import create_app
from kwanzaa_adapter.config import load_training_config
from kwanzaa_adapter.contract import DEFAULT_SYSTEM_PROMPT, Answer
from kwanzaa_adapter.data.records import Document, RagRecord, render_record

KEY = "page-test-key"
LIMITS = ServeLimits(max_documents=3, max_new_tokens=160)
ANSWER = Answer.model_validate({
    "version": "kwanzaa.answer.v1",
    "answer": {"text": "Kwanzaa was first celebrated in 1966 [1], with a candle lit each day [2].",
               "confidence": 0.9, "completeness": "complete"},
    "sources": [{"citation": 1, "title": DOCUMENTS[0]["title"], "source": DOCUMENTS[0]["source"], "year": 2003},
                {"citation": 2, "title": DOCUMENTS[1]["title"], "source": DOCUMENTS[1]["source"], "year": 2010}],
    "unknowns": {}})


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium; skipped, with the reason in the summary (`-rs`), where it or Playwright is missing."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(f"browser tests need headless Chromium: {reason}")
    with launched() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


# --- the run report -------------------------------------------------------------------------------


def test_the_report_opens_offline_with_every_section_and_a_screenshot(gated_run, page):
    _, _, result = gated_run
    seen = requests_of(page)
    page.goto(result.report.resolve().as_uri())
    assert outside(seen, "file") == [] and seen == [result.report.resolve().as_uri()]
    for section in SECTIONS:
        assert page.locator(f"section#{section} h2").is_visible(), section
    assert page.locator("#behavior table").count() >= 1 and page.locator("#behavior svg").count() >= 1
    assert page.locator("#gate svg").count() == 1  # the gate's probabilities by class
    assert page.locator("#training svg").count() == 2  # curves, and the phases
    # every link inside the page lands on an element of it
    targets = page.eval_on_selector_all("a[href^='#']", "links => links.map(a => a.getAttribute('href').slice(1))")
    assert targets and all(page.locator(f"[id='{t}']").count() == 1 for t in targets)
    data = screenshot(page)
    width, height = png_size(data)
    assert width == 1280 and height > 1500 and len(data) > 50_000


# --- the page of `serve` ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parrot(tmp_path_factory, tokenizer):
    """A tiny Llama that learned one contract answer to the page's question over its two documents, so that
    the page shows a real answer with its sources (trained here in about ten seconds, full weights, the loss
    on the answer's tokens only; served without an adapter)."""
    directory = tmp_path_factory.mktemp("parrot")
    model = build_tiny_model("llama", len(tokenizer), seed=3).train()
    prompt = render_record(RagRecord(id="p", question=QUESTION, documents=[Document(**d) for d in DOCUMENTS],
                                     expect_refusal=False), DEFAULT_SYSTEM_PROMPT)
    start = len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    ids = torch.tensor([tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": ANSWER.to_json()}],
                                                      tokenize=True)["input_ids"]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        hidden = model.model(input_ids=ids).last_hidden_state[0, start - 1:-1]
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden), ids[0, start:])
        if loss.item() < 0.02:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.02, loss.item()
    model.eval().save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    config = write_run_config(directory, directory / "model", quantization={"load_in_4bit": False},
                              evaluation={"max_new_tokens": 160, "constrained_decoding": True})
    return model_from_config(load_training_config(config))


@pytest.fixture(scope="module")
def served(parrot):
    with running(create_app(parrot, LIMITS, api_key=KEY)) as url:
        yield url


def test_a_question_over_two_documents_gets_its_answer_rendered_with_its_sources(served, page):
    seen = requests_of(page)
    page.goto(served)
    assert page.locator("#key-row").is_visible()  # the server wants a key: the page asks for it
    fill_documents(page, DOCUMENTS, QUESTION, KEY)
    ask(page)
    assert page.locator("#problem").is_hidden()
    assert page.inner_text("#answer .text") == ANSWER.answer.text
    assert page.locator("#answer a.cite").evaluate_all("links => links.map(a => a.getAttribute('href'))") \
        == ["#source-1", "#source-2"]
    assert page.locator("#answer ol.sources li").all_inner_texts() == [
        "Kwanzaa's First Celebration (community history notes, 2003)", "The Kinara (holiday guide, 2010)"]
    status = page.inner_text("#status")
    assert status.startswith("complete, confidence 0.90 · ") and re.search(r" · \d+\.\d s · ", status)
    assert outside(seen, served) == []  # the page, then /v1/answer: nothing else, nowhere else


def test_a_wrong_api_key_is_shown_on_the_page(served, page):
    page.goto(served)
    fill_documents(page, DOCUMENTS, QUESTION, "not-the-key")
    ask(page)
    assert "The API key was refused (401)" in page.inner_text("#problem")
    assert page.inner_text("#answer") == ""


@pytest.mark.parametrize("documents, message", [
    ("", "No documents"),
    ('{"title": "Kwanzaa", "text": "A holiday."}\n{"title": "no text"}', 'documents, line 2: the document has no "text"'),
    ('{"title": "Kwanzaa", "text": "A holiday."}\nnot json', "documents, line 2: not JSON"),
    ("\n".join(json.dumps({"title": f"d{i}", "text": "t"}) for i in range(4)), "4 documents: this server takes at most 3"),
])
def test_bad_input_gets_a_message_on_the_page_and_no_request(served, page, documents, message):
    seen = requests_of(page)
    page.goto(served)
    page.fill("#documents", documents)
    page.fill("#question", QUESTION)
    page.fill("#key", KEY)
    page.click("#send")
    page.wait_for_selector("#problem:not(.hidden)")
    assert message in page.inner_text("#problem")
    assert seen == [served + "/"]  # checked in the page: nothing was sent


def test_a_limit_only_the_server_knows_comes_back_as_a_message(served, page):
    page.goto(served)
    long_question = "Why " * 1200  # over the server's 4,000 characters
    fill_documents(page, DOCUMENTS[:1], long_question, KEY)
    ask(page)
    assert "The server refused the request (413): question: " in page.inner_text("#problem")


def test_the_page_runs_under_its_content_security_policy(served, page):
    """The policy allows the page's own script and style (by hash) and nothing else: a script it did not bring
    is blocked, and the page still works."""
    violations = []
    page.on("console", lambda message: violations.append(message.text) if "Content Security Policy" in message.text
            else None)
    response = page.goto(served)
    policy = response.headers["content-security-policy"]
    assert policy.startswith("default-src 'none'; script-src 'sha256-") and "connect-src 'self'" in policy
    injected = page.evaluate("""() => { const s = document.createElement('script');
        s.textContent = 'window.injected = 1'; document.body.append(s); return window.injected === 1; }""")
    assert injected is False and any("script-src" in v for v in violations)
    assert page.locator("#limits").inner_text() == "up to 3 documents"  # the inline script ran
    assert KEY not in page.content()
