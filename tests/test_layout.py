"""The project's own modules import each other without a cycle and in at most six levels, counting
imports anywhere in a file (inside functions and `if __name__ == "__main__":` too)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def local_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(MODULES)


GRAPH = {name: local_imports(path) for name, path in MODULES.items()}


def levels() -> dict[str, int]:
    """1 for a module that imports none of ours, else one more than the highest it imports; a cycle fails."""
    level, visiting = {}, []

    def visit(name: str) -> int:
        assert name not in visiting, f"import cycle: {' -> '.join(visiting[visiting.index(name):] + [name])}"
        if name not in level:
            visiting.append(name)
            level[name] = 1 + max((visit(m) for m in GRAPH[name]), default=0)
            visiting.pop()
        return level[name]
    for name in GRAPH:
        visit(name)
    return level


def test_no_import_cycle_and_at_most_six_levels():
    level = levels()
    assert max(level.values()) <= 6, f"levels: {sorted(level.items(), key=lambda kv: kv[1])}"
    assert level["masking"] == level["vmae"] == 1  # the model and the masks stand alone
    assert GRAPH["data"] == GRAPH["checkpoints"] == {"vmae"}  # the model's input convention; its key names


def test_the_cycle_check_can_fail(monkeypatch):
    monkeypatch.setitem(GRAPH, "vmae", {"engine"})  # engine imports vmae
    try:
        levels()
    except AssertionError as e:
        assert "import cycle" in str(e)
    else:
        raise AssertionError("a cycle went unnoticed")
