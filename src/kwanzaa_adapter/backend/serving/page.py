"""`GET /`: one self-contained page to try the adapter (documents, a question, the streamed answer rendered with
its sources), and the Content-Security-Policy that lets it run its own script and style and reach nothing but
this server."""

from __future__ import annotations

import base64
import hashlib
import re

import jinja2

from kwanzaa_adapter.backend.serving.schemas import ServeLimits

_INLINE = {"script": re.compile(r"<script>(.*?)</script>", re.S), "style": re.compile(r"<style>(.*?)</style>", re.S)}


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def content_security_policy(html: str) -> str:
    """Nothing by default; the page's own inline script and style by their SHA-256; requests to this origin only."""
    allowed = {kind: " ".join(_digest(block) for block in pattern.findall(html)) or "'none'"
               for kind, pattern in _INLINE.items()}
    return (f"default-src 'none'; script-src {allowed['script']}; style-src {allowed['style']}; "
            "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def render_page(limits: ServeLimits, key_required: bool) -> tuple[str, dict[str, str]]:
    """The page and its response headers. It says whether the server wants an API key, never the key."""
    environment = jinja2.Environment(loader=jinja2.PackageLoader("kwanzaa_adapter.backend.serving", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    html = environment.get_template("page.html.j2").render(key_required=key_required,
                                                           max_documents=limits.max_documents)
    headers = {"Content-Security-Policy": content_security_policy(html), "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    return html, headers
