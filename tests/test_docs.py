"""The documentation stays a guide: the README's size, links that lead somewhere, a true layout map."""

from __future__ import annotations

import re

from tests.docblocks import README, ROOT, documentation_pages

README_LIMIT_BYTES = 30_000
DESIGN = ROOT / "docs" / "design.md"
# Top-level directories whose paths the layout map may name; a backticked token starting with one
# of them is a path and must exist.
_MAPPED_ROOTS = (
    "server/",
    "client/",
    "tests/",
    "bench/",
    "bench-results/",
    "scripts/",
    "deploy/",
    "protos/",
    "examples/",
    "api/",
    "requirements/",
    "docs/",
)
_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s#]*)(?:#[^)\s]*)?\)")


def test_readme_is_a_guide_not_a_diary() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, (
        f"README.md is {size:,} bytes; move detail to docs/ (limit {README_LIMIT_BYTES:,})"
    )


def test_every_relative_link_leads_to_a_file() -> None:
    broken = []
    for page in documentation_pages():
        for match in _LINK.finditer(page.read_text()):
            target = match["target"]
            if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # a link within the page, or to another scheme
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def _layout_section() -> str:
    text = DESIGN.read_text()
    match = re.search(r"^## Layout\n(?P<body>.*?)(?=^## )", text, re.M | re.S)
    assert match, "docs/design.md has no '## Layout' section"
    return match["body"]


def _mapped_paths() -> set[str]:
    """Every path the layout map names in backticks (its rows and their descriptions)."""
    tokens = re.findall(r"`([^`\s]+)`", _layout_section())
    return {t for t in tokens if t.startswith(_MAPPED_ROOTS)}


def _code_units(package_root: str) -> set[str]:
    """The packages (as `dir/`) and loose modules of one top-level package; not their insides."""
    root = ROOT / package_root
    units = {f"{package_root}/{p.name}" for p in root.glob("*.py")}
    units |= {f"{package_root}/{d.name}/" for d in root.iterdir() if (d / "__init__.py").is_file()}
    return units


def test_the_layout_map_names_only_what_exists() -> None:
    missing = sorted(p for p in _mapped_paths() if not (ROOT / p).exists())
    assert not missing, f"docs/design.md's layout map names paths that do not exist: {missing}"


def test_the_layout_map_names_every_package_and_loose_module() -> None:
    mapped = _mapped_paths()
    unmapped = sorted((_code_units("server") | _code_units("client")) - mapped)
    assert not unmapped, f"docs/design.md's layout map is missing: {unmapped}"


def test_the_layout_map_covers_the_top_level_directories() -> None:
    mapped = _mapped_paths()
    for directory in ("tests/", "bench/", "scripts/", "deploy/", "protos/"):
        assert any(p.startswith(directory) for p in mapped), f"layout map has no row for {directory}"


def test_pages_are_where_the_readme_says() -> None:
    readme = README.read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
    assert (ROOT / "bench-results" / "README.md").is_file()
