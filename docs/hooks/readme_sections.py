"""MkDocs hook: pages that show a section of README.md, so it has one source.

A page containing ``<!-- readme-section: TITLE -->`` gets, in its place, the README's
``## TITLE`` section (up to the next ``## `` heading), its headings raised one level and
its links to ``docs/...`` made relative to the site.  ``<!-- readme-subsection: TITLE -->``
does the same for a ``### TITLE`` section.  ``; until: OTHER`` ends the text before the
heading ``OTHER`` (of any level) instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = re.compile(r"<!--\s*readme-(section|subsection):\s*(.+?)\s*(?:;\s*until:\s*(.+?)\s*)?-->")


def _section(text: str, level: int, title: str, until: str | None = None) -> str:
    lines = text.splitlines()
    heading = "#" * level + " " + title
    try:
        start = lines.index(heading)
    except ValueError:
        raise ValueError(f"README.md has no heading {heading!r}") from None
    end = start + 1
    while end < len(lines) and not re.match(rf"#{{1,{level}}} ", lines[end]):
        if until is not None and re.fullmatch(r"#+ " + re.escape(until), lines[end]):
            break
        end += 1
    body = "\n".join(lines[start + 1 : end])
    body = re.sub(r"^(#+) ", lambda m: "#" * max(1, len(m[1]) - level + 1) + " ", body, flags=re.M)
    return re.sub(r"\]\(docs/", "](", body)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if "readme-s" not in markdown:
        return markdown
    text = README.read_text(encoding="utf-8")
    return MARKER.sub(lambda m: _section(text, 2 if m[1] == "section" else 3, m[2], m[3]), markdown)
