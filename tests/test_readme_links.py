"""Every relative link of the README, the docs and the results index resolves (issue 20).

A link ``[text](path)`` or ``![alt](path)`` that is not http(s) / mailto must point at a file or folder that
exists, relative to the page; ``path#anchor`` (or ``#anchor`` on the same page) into a markdown file must name
one of its headings, slugged as GitHub does. Links inside code (fenced blocks, inline spans) are not links.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "results" / "README.md"]


def _prose(text: str) -> str:
    """The text without code: fenced blocks and inline spans removed (their brackets are not links)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped (letters, digits, ``_``, ``-``, spaces kept),
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    """Each link of ``page`` that does not resolve, as ``target (why)``."""
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^(https?:|mailto:)", target):
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / unquote(path_part)).resolve() if path_part else page
        if not resolved.exists():
            bad.append(f"{target} (no such file)")
        elif anchor and resolved.is_file() and resolved.suffix == ".md" and unquote(anchor) not in anchors(resolved):
            bad.append(f"{target} (no heading with anchor #{anchor} in {resolved.name})")
    return bad


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links: {broken_links(page)}"


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "there.md").write_text("# A heading: `code`, and more\n\n## Twice\n\n## Twice\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md) [ok](there.md#a-heading-code-and-more) [ok](there.md#twice-1) [ok](#local) "
        "[web](https://example.org/nowhere) ![missing](img/none.png) [missing](nowhere.md) "
        "[bad anchor](there.md#nope) `[in code](ignored.md)`\n\n"
        "```\n[in a block](ignored_too.md)\n```\n\n## Local\n",
        encoding="utf-8",
    )
    assert broken_links(page) == [
        "img/none.png (no such file)",
        "nowhere.md (no such file)",
        "there.md#nope (no heading with anchor #nope in there.md)",
    ]


def test_slug_matches_github():
    assert slug("Fused updates: `FAdjoint(..., fuse_update=True)`") == "fused-updates-fadjoint-fuse_updatetrue"
    assert slug("The equilibrium F-adjoint's claim") == "the-equilibrium-f-adjoints-claim"
    assert slug("§1 F-propagation and the F-adjoint") == "1-f-propagation-and-the-f-adjoint"
