"""The package's layout (issue 14): imports follow the flow recorder → tables → sweep → rules → optimizers
one way, with no cycle; a rule reaches a layer only through the tables' verbs."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torch_fadjoint"

# module → the package modules it may import (at any level of the file)
ALLOWED = {
    "nn": set(), "losses": set(), "data": set(), "distributed": set(),
    "maps": {"nn", "layers"}, "layers": {"maps"},  # layers/maps: only each other's names, lazily in register_*
    "sweep": {"layers"},
    "recorder": {"layers", "maps", "sweep", "losses", "distributed"},
    "rules": {"sweep", "layers", "maps", "losses"},
    "optim": {"rules", "recorder", "sweep", "losses"},
    "graph": {"optim", "recorder", "sweep"},
}


def _group(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] in ("rules", "optim") else rel.name


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = (node.module or "").split(".")
            depth = node.level - (1 if _group(path) in ("rules", "optim") else 0)
            if depth == 1 and parts[0]:  # from ..x import / from .x import at the package root
                found.add(parts[0])
            elif depth == 1:
                found.update(alias.name for alias in node.names)
    return found


def test_imports_follow_the_flow():
    for path in PACKAGE.rglob("*.py"):
        group = _group(path)
        if group == "__init__":
            continue
        extra = _imports(path) - ALLOWED[group] - {group}
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


def test_rules_speak_only_the_tables_verbs():
    """No rule or optimizer multiplies by a weight itself (``.mm(weight)``, ``.t().mm(x_prev)``): that is a
    layer entry's job (STYLE P9)."""
    pattern = re.compile(r"\.mm\(|\.weight\b|F\.linear|conv\dd\(")
    for path in list((PACKAGE / "rules").glob("*.py")) + list((PACKAGE / "optim").glob("*.py")) + [PACKAGE / "sweep.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith((">>>", '"', "'")):
                raise AssertionError(f"{path.name}:{number}: {line.strip()}")
