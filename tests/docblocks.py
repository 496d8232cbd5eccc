"""The marked command blocks of README.md and docs/*.md, for the tests that run them as written.

A block preceded by `<!-- readme-test: sh -->` is shell commands, `<!-- readme-test: reshard -->`
commands that change the cluster's layout, and `<!-- readme-test: file PATH -->` a block that must
equal the file PATH of the repository. Blocks come in reading order: README.md first, then the
pages of docs/ by name, so the shell blocks of one session run in the order a reader meets them.

A support module, not a test module: test modules import from here, never from each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MARKER = "<!-- readme-test:"
_BLOCK = re.compile(
    r"<!-- readme-test: (?P<kind>sh|reshard|file (?P<path>\S+)) -->\n```(?P<lang>\w+)\n(?P<body>.*?)^```",
    re.M | re.S,
)


@dataclass(frozen=True)
class Block:
    kind: str
    path: str | None
    body: str
    source: Path


def documentation_pages() -> list[Path]:
    """README.md, then docs/*.md by name: where marked blocks may live."""
    return [README, *sorted(DOCS.glob("*.md"))]


def marked_blocks() -> list[Block]:
    return [
        Block("file" if m["path"] else m["kind"], m["path"], m["body"], page)
        for page in documentation_pages()
        for m in _BLOCK.finditer(page.read_text())
    ]


def marker_count() -> int:
    """Markers in all pages, whether or not a fenced block follows them."""
    return sum(page.read_text().count(MARKER) for page in documentation_pages())
