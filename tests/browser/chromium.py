"""Headless Chromium driven by Playwright for the browser tests, and the screenshots the docs show.

Debian's `chromium` package is the browser (`.ci/run` installs it); Playwright's own browser download is never
used. As a script it takes the docs' screenshots with the tests' own code:

    python tests/browser/chromium.py report RUN_DIR/report.html docs/report.png
    python tests/browser/chromium.py page http://127.0.0.1:8000 docs/page.png [--key KEY]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SECTIONS = ("what", "proofs", "training", "behavior", "gate", "answers")
# Two documents and a question the demo adapter answers from the first (data/kwanzaa_eval.jsonl's topics).
DOCUMENTS = [
    {"title": "Kwanzaa's First Celebration", "source": "community history notes", "year": 2003,
     "text": "Maulana Karenga created Kwanzaa in 1966. The first Kwanzaa was celebrated from December 26, 1966, "
             "to January 1, 1967, in Los Angeles."},
    {"title": "The Kinara", "source": "holiday guide", "year": 2010,
     "text": "The kinara holds seven candles: three red, one black and three green. One candle is lit on each "
             "day of Kwanzaa."},
]
QUESTION = "In what year was Kwanzaa first celebrated?"


def unavailable() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no chromium on PATH (Debian: apt-get install -y chromium; .ci/run installs it)"
    return None


@contextmanager
def launched():
    """A headless Chromium (without the sandbox as root, where Chromium refuses it)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        arguments = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=arguments)
        try:
            yield browser
        finally:
            browser.close()


def requests_of(page) -> list[str]:
    """Every URL the page asks for from now on (documents, scripts, fonts, images, fetches), in order."""
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))
    return seen


def outside(urls: list[str], origin: str) -> list[str]:
    """The URLs not of `origin` ("file" for a local file, else scheme://host:port)."""
    def of(url: str) -> str:
        parsed = urlparse(url)
        return "file" if parsed.scheme == "file" else f"{parsed.scheme}://{parsed.netloc}"

    return [url for url in urls if of(url) != origin]


def fill_documents(page, documents: list[dict], question: str, key: str | None = None) -> None:
    """The page's form: documents as JSON lines, the question, the API key where asked for."""
    page.fill("#documents", "\n".join(json.dumps(d) for d in documents))
    page.fill("#question", question)
    if key is not None:
        page.fill("#key", key)


def ask(page, timeout_ms: float = 120_000) -> None:
    """Click Ask and wait for the answer's status line or a message about the request."""
    page.click("#send")
    # a selector, not a script: the page's policy forbids evaluating strings as code
    page.wait_for_selector("#status:not(:empty), #problem:not(.hidden)", timeout=timeout_ms)


def screenshot(page, path: str | Path | None = None, full_page: bool = True) -> bytes:
    data = page.screenshot(path=str(path) if path else None, full_page=full_page)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("report", "page"))
    parser.add_argument("target", help="the report's HTML file, or the server's base URL")
    parser.add_argument("output", help="PNG to write")
    parser.add_argument("--key", help="the server's API key, typed into the page")
    args = parser.parse_args(argv)
    if reason := unavailable():
        print(f"error: {reason}", file=sys.stderr)
        return 2
    with launched() as browser:
        page = browser.new_page(viewport={"width": 1280, "height": 1500 if args.what == "report" else 900})
        if args.what == "report":
            page.goto(Path(args.target).resolve().as_uri())
            screenshot(page, args.output, full_page=False)
        else:
            page.goto(args.target)
            fill_documents(page, DOCUMENTS, QUESTION, args.key)
            ask(page)
            screenshot(page, args.output, full_page=False)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
