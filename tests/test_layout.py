"""The house stays readable: no import cycles, the two files a reader starts with stay short, and
README's layout section names every module that exists (and none that does not)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nanotune"


def module_imports() -> dict[str, set[str]]:
    """Module name -> the nanotune modules it imports, at the top or inside functions."""
    files = {".".join(("nanotune", *p.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                candidates = [module] + [f"{module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            targets |= {c for c in candidates if c in files and c != name}
        edges[name] = targets
    return edges


def test_no_module_of_nanotune_imports_itself_through_others():
    edges = module_imports()
    cycles = []

    def visit(node, path):
        for target in edges[node]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target, path + [target])
        done.add(node)

    done: set[str] = set()
    for module in edges:
        if module not in done:
            visit(module, [module])
    assert not cycles, cycles[:3]


def test_the_loop_and_the_model_stay_short_enough_to_read_in_one_sitting():
    assert len((PACKAGE / "model.py").read_text(encoding="utf-8").splitlines()) <= 450
    assert len((PACKAGE / "train.py").read_text(encoding="utf-8").splitlines()) <= 350


def test_readme_layout_names_exactly_the_modules_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b([a-z_]+\.py)\b", layout))
    existing = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    existing |= {p.name for p in ROOT.glob("*.py")} | {p.name for p in (ROOT / "tokenizer_tools").glob("*.py")
                                                         if p.name != "__init__.py"}
    assert existing - named == set(), f"modules missing from README's layout: {sorted(existing - named)}"
    assert named - existing == set(), f"README's layout names files that do not exist: {sorted(named - existing)}"
