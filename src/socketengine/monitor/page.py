"""The monitor's one static page (``page.html``, package data) and its security policy."""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from typing import Tuple

__all__ = ["load_page"]


def load_page() -> Tuple[bytes, str]:
    """The page and a Content-Security-Policy allowing exactly its inline code.

    The policy lists the SHA-256 of the page's ``<script>`` and ``<style>`` blocks, so
    nothing else runs or styles it: no inline handlers, no injected markup, nothing
    loaded from elsewhere.
    """
    page = resources.files(__package__).joinpath("page.html").read_text("utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
            for s in found
        )

    csp = (
        "default-src 'none'; "
        f"script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' blob: data:; connect-src 'self'; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    )
    return page.encode("utf-8"), csp
