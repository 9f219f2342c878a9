"""The code passes the linter configured in pyproject.toml (ruff: pyflakes, pycodestyle, bugbear, import order)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _module_imports(path: Path) -> set[str]:
    """egrpo modules a file imports, at the top or inside functions (a function-local import that only
    breaks a cycle at load time still ties the two modules together); ``if TYPE_CHECKING`` blocks aside."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {
        id(n) for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("egrpo"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from egrpo.x import module`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("egrpo"))
    return found


def test_no_import_cycles_between_egrpo_modules():
    modules = {}
    for path in sorted((ROOT / "egrpo").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {m: {i for i in _module_imports(p) if i in modules and i != m} for m, p in modules.items()}
    visiting, done = [], set()

    def visit(m):
        if m in visiting:
            raise AssertionError("import cycle: " + " -> ".join(visiting[visiting.index(m):] + [m]))
        if m not in done:
            visiting.append(m)
            for n in sorted(graph[m]):
                visit(n)
            visiting.pop()
            done.add(m)

    for m in sorted(graph):
        visit(m)
