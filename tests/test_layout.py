"""The package's layout (issues 14, 20): imports follow the flow recorder → tables → sweep → rules → optimizers
one way, with no cycle (not even a lazy import inside a function); a rule reaches a layer only through the
tables' verbs."""
import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torch_fadjoint"

# module → the package modules it may import (at any level of the file, a function's body included)
ALLOWED = {
    "nn": set(), "losses": set(), "data": set(), "distributed": set(), "tables": set(),
    "junctions": set(),  # the junction table (issue 21) and its base; the next two fill it
    "arithmetic": {"junctions"}, "activations": {"junctions"},
    "functionals": {"junctions"}, "poolings": {"junctions"},  # the layers, dropout and poolings as function entries
    "maps": {"nn", "tables"},
    "layers": {"maps", "tables"},  # a layer's record holds its maps' records (MapRecord)
    "sweep": {"layers"},
    "steps": {"junctions"},  # tfa.nn.Step's entry (torch.heaviside)
    "tape_writes": set(),  # what a recorded forward may write, and what a refused one puts back
    "tape": {"junctions", "arithmetic", "activations", "functionals", "poolings", "steps", "tape_writes"},  # the graph: ops through the table
    "module_reads": set(),  # what a sweep reads through a module, and how two readings compare
    "chain": {"layers", "maps", "module_reads"},
    "tape_sweep": {"tape"},  # the sweep over a recorded tape (the F-adjoint, the rules' interface)
    "output": {"tape", "tape_writes", "losses"},  # the returned output that notices a change before the loss (its op names: the tape's; in-place names: tape_writes)
    "recorder": {"chain", "layers", "maps", "sweep", "losses", "distributed", "tape", "tape_sweep", "output"},  # the façade, the tape recorder
    "rules": {"sweep", "layers", "maps", "losses", "tape", "tape_sweep"},  # the tape's sweep and its TapeRule
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


def _graph() -> dict[str, set[str]]:
    """group → the package groups its files import (``__init__`` files left out: they only re-export)."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            graph.setdefault(_group(path), set()).update(_imports(path) - {_group(path)})
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, …, a]``, or None."""
    done: set[str] = set()

    def visit(node, path):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, path + [node])
            if found:
                return found
        done.add(node)
        return None

    for start in sorted(graph):
        found = visit(start, [])
        if found:
            return found
    return None


def test_imports_follow_the_flow():
    for path in PACKAGE.rglob("*.py"):
        group = _group(path)
        if group == "__init__":
            continue
        assert group in ALLOWED, f"{path.relative_to(PACKAGE)}: a new module; say in ALLOWED what it may import"
        extra = _imports(path) - ALLOWED[group] - {group}
        assert not extra, f"{path.relative_to(PACKAGE)} imports {sorted(extra)}"


def test_no_import_cycle():
    """Neither the imports allowed above nor those in the files go round: no exception, lazy or not."""
    assert _cycle(ALLOWED) is None, f"ALLOWED has the cycle {' → '.join(_cycle(ALLOWED))}"
    assert _cycle(_graph()) is None, f"the package imports go round: {' → '.join(_cycle(_graph()))}"


def test_cycle_finder_sees_a_cycle():
    assert _cycle({"maps": {"nn", "layers"}, "layers": {"maps"}, "nn": set()}) == ["layers", "maps", "layers"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_rules_speak_only_the_tables_verbs():
    """No rule or optimizer multiplies by a weight itself (``.mm(weight)``, ``.t().mm(x_prev)``): that is a
    layer entry's job (STYLE P9)."""
    pattern = re.compile(r"\.mm\(|\.weight\b|F\.linear|conv\dd\(")
    for path in list((PACKAGE / "rules").glob("*.py")) + list((PACKAGE / "optim").glob("*.py")) + [PACKAGE / "sweep.py"]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith((">>>", '"', "'")):
                raise AssertionError(f"{path.name}:{number}: {line.strip()}")


def test_a_module_over_400_lines_says_why_at_its_top():
    """STYLE: a module over ~400 lines is a design smell unless its docstring says why ("Over 400 lines: …")."""
    silent = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > 400 and "Over 400 lines:" not in (ast.get_docstring(ast.parse(text)) or ""):
            silent.append(f"{path.relative_to(PACKAGE)} ({text.count(chr(10))} lines)")
    assert not silent, f"no reason given at the top of: {', '.join(silent)}"
