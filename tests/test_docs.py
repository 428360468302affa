"""The maths page and the citations of it (issue 20): the repository documents its own maths.

Every ``docs/maths.md §n.m`` citation in the code, the tests, the benchmarks, the scripts and the Markdown pages
names a heading of ``docs/maths.md``. No module of the package cites the shared reference that lives outside
the repository (a clone from a public host has no ``ALGORITHMS.md``). Every module that implements maths says,
in its module docstring, which section it implements. Pure text checks: no torch, no model.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "torch_fadjoint"
MATHS = ROOT / "docs" / "maths.md"

# "## §3 …" or "### §3.2 …": the section sign, the number, a space, the title.
HEADING = re.compile(r"^(#+) §(\d+(?:\.\d+)*) \S")
# "docs/maths.md §1.2", "docs/maths.md §2.1–§2.4", "docs/maths.md §1.2, §6.1–§6.2", "docs/maths.md §2.2-§2.4".
CITATION = re.compile(r"docs/maths\.md\s+(§\d+(?:\.\d+)*(?:\s*(?:,|–|-|and|to)\s*§\d+(?:\.\d+)*)*)")
SECTION = re.compile(r"§(\d+(?:\.\d+)*)")

# The sections of the shared reference that docs/maths.md must keep, with the same numbers (§7, graphs, is not
# implemented yet: it gets its heading when it is).
REFERENCE_SECTIONS = (
    ["1", "1.1", "1.2", "1.3", "1.4", "2", "2.1", "2.2", "2.3", "2.4", "3", "3.1", "3.2", "3.3", "3.4", "4", "5",
     "5.1", "5.2", "5.3", "6"] + [f"6.{i}" for i in range(1, 8)]
)

BEING_CONVERTED: set = set()  # modules whose citations are being moved to docs/maths.md (none)

# Package modules that implement no maths: they need no section.
PLUMBING = {
    "data.py": "loads MNIST / Fashion-MNIST into tensors",
    "distributed.py": "averages each rule's feedback over ranks (communication only; the feedback is the rule's)",
}


def headings() -> dict[str, int]:
    """{section number: heading level} of docs/maths.md."""
    found: dict[str, int] = {}
    for line in MATHS.read_text(encoding="utf-8").splitlines():
        match = HEADING.match(line)
        if match:
            number = match.group(2)
            assert number not in found, f"docs/maths.md: §{number} has two headings"
            found[number] = len(match.group(1))
    return found


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line number, section number) of every docs/maths.md citation in ``text``."""
    cited = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        cited += [(line, number) for number in SECTION.findall(match.group(1))]
    return cited


def citing_files() -> list[Path]:
    """The Python files of the package, tests, benchmarks and scripts, and the repository's Markdown pages."""
    files = [path for folder in ("torch_fadjoint", "tests", "benchmarks", "scripts")
             for path in sorted((ROOT / folder).rglob("*.py"))]
    files += [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "benchmarks" / "results").rglob("*.md"))
    return [path for path in files if path.is_file()]


def package_modules() -> list[str]:
    return sorted(path.relative_to(PACKAGE).as_posix() for path in PACKAGE.rglob("*.py"))


def is_trivial(source: str) -> bool:
    """Only a docstring, imports and ``__all__``: a subpackage's ``__init__`` that re-exports."""
    for node in ast.parse(source).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            continue
        return False
    return True


def test_maths_page_keeps_the_reference_numbering():
    """§1–§6 with their subsections, each at its level (## §n, ### §n.m), in order, every §n.m under its §n."""
    found = headings()
    missing = [number for number in REFERENCE_SECTIONS if number not in found]
    assert not missing, f"docs/maths.md lacks the headings of {', '.join('§' + n for n in missing)}"
    for number, level in found.items():
        assert level == number.count(".") + 2, f"docs/maths.md: §{number} is a level-{level} heading"
        parent = number.rsplit(".", 1)[0]
        assert "." not in number or parent in found, f"docs/maths.md: §{number} without §{parent}"
    order = [tuple(map(int, number.split("."))) for number in found]
    assert order == sorted(order), "docs/maths.md: the section headings are out of order"


def test_every_citation_names_a_heading_of_the_maths_page():
    """A citation of docs/maths.md, in the code or in a page, names a section that exists; so does every
    cross-reference (§n.m) inside docs/maths.md itself."""
    found = headings()
    bad, count = [], 0
    for path in citing_files():
        for line, number in cited_sections(path.read_text(encoding="utf-8")):
            count += 1
            if number not in found:
                bad.append(f"{path.relative_to(ROOT)}:{line}: §{number}")
    for line_no, line in enumerate(MATHS.read_text(encoding="utf-8").splitlines(), 1):
        for number in SECTION.findall(line):
            if number not in found:
                bad.append(f"docs/maths.md:{line_no}: §{number}")
    assert not bad, "citations of sections docs/maths.md does not have:\n" + "\n".join(bad)
    assert count > 50, f"only {count} citations found: is the pattern still right?"


def test_citation_pattern_reads_ranges_and_lists():
    """The parser itself: single sections, ranges with an en dash or a hyphen, lists; not a bare § elsewhere."""
    text = ("docs/maths.md §1.2\n(docs/maths.md §2.1–§2.4, §6.3)\ndocs/maths.md §2.2-§2.4.\n"
            "docs/maths.md §3 names them\nSee §9.9 of another file\n")
    assert cited_sections(text) == [(1, "1.2"), (2, "2.1"), (2, "2.4"), (2, "6.3"), (3, "2.2"), (3, "2.4"),
                                    (4, "3")]


def test_no_package_module_cites_the_shared_reference():
    """The shared ALGORITHMS.md is outside the repository: the package cites docs/maths.md instead."""
    citing = [name for name in package_modules() if name not in BEING_CONVERTED
              and "ALGORITHMS.md" in (PACKAGE / name).read_text(encoding="utf-8")]
    assert not citing, f"cite docs/maths.md, not ALGORITHMS.md, in: {', '.join(citing)}"


def test_every_maths_module_says_which_section_it_implements():
    """Each module's docstring cites docs/maths.md §…, except plumbing (PLUMBING, with the reason) and the
    subpackages' re-exporting ``__init__`` files."""
    for name in PLUMBING:
        assert (PACKAGE / name).is_file(), f"PLUMBING lists {name}, which no longer exists"
    lacking = []
    for name in package_modules():
        source = (PACKAGE / name).read_text(encoding="utf-8")
        if name in PLUMBING or name in BEING_CONVERTED or ("/" in name and name.endswith("__init__.py")
                                                           and is_trivial(source)):
            continue
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if "docs/maths.md §" not in docstring:
            lacking.append(name)
    assert not lacking, ("module docstrings without a docs/maths.md § citation (cite the section, or list the "
                         f"module in PLUMBING with the reason): {', '.join(lacking)}")


@pytest.mark.parametrize("source,trivial", [
    ('"""Re-exports."""\nfrom .a import b\n__all__ = ["b"]\n', True),
    ('"""Re-exports."""\nfrom .a import b\nX = b()\n', False),
    ('def f():\n    pass\n', False),
])
def test_trivial_init_detection(source, trivial):
    assert is_trivial(source) is trivial
