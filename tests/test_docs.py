"""Every relative link in README.md and docs/ points at a file or folder of the checkout.

Links inside code (fenced blocks, `inline code`) are text, not links, and are not checked; http(s) and
mailto links are left to the reader; an anchor (`#...`) is cut off and only the file is checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.support.files import REPO

DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
_INLINE = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(?:<([^>\n]*)>|([^)\s]*))(?:\s+[\"'(][^)]*)?\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+[\"'(].*)?$", re.MULTILINE)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)  # http:, https:, mailto:, ...


def relative_links(markdown: str) -> list[str]:
    """The targets of the links of a markdown text that name a path (external links and code left out)."""
    prose = _CODE_SPAN.sub("", _FENCE.sub("", markdown))
    targets = [bracketed or bare for bracketed, bare in _INLINE.findall(prose)] + _REFERENCE.findall(prose)
    return [target for target in targets if target and not target.startswith("#") and not _EXTERNAL.match(target)]


def test_relative_links_are_found_and_code_is_not_a_link():
    text = ("See [a](docs/A.md#part), ![b](img/b.png \"title\"), [c](https://example.com/x.md), [d](#top),\n"
            "`[e](not/a/link.md)`, [f][ref] and [g](<with space.md>).\n\n"
            "```bash\necho '[h](inside/a/block.md)'\n```\n\n[ref]: ref/target.md \"Title\"\n")
    assert relative_links(text) == ["docs/A.md#part", "img/b.png", "with space.md", "ref/target.md"]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_points_at_a_file_that_exists(document: Path):
    broken = []
    for target in relative_links(document.read_text(encoding="utf-8")):
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        resolved = (REPO / path.lstrip("/")) if path.startswith("/") else (document.parent / path)
        if not resolved.exists():
            broken.append(target)
    assert not broken, f"{document.relative_to(REPO)} links to missing files: {broken}"
