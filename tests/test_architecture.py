"""The shape of the code (docs/architecture.md), held: imports point one way, no module is
longer than one person can read in a sitting, and each lane's loop fits on a screen."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*ROOT.glob("studio/**/*.py"), *ROOT.glob("pipelines/**/*.py")])
LOOPS = {  # the functions that yield each lane's events
    "pipelines/text_generation.py": ["stream", "_run", "generate"],
    "pipelines/fast_decode.py": ["fast_generate", "_fast_events"],
    "pipelines/speculative.py": ["speculative_generate"],
    "pipelines/latent_diffusion.py": ["stream", "_run"],
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The project's modules that `path` imports, anywhere in it (inside functions too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            # "from package import module" imports the module; "from module import name" the module
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    modules = {module_name(p) for p in SOURCES}
    graph = {module_name(p): imports(p, modules) for p in SOURCES}
    done, cycles = set(), []

    def visit(module, path):
        if module in path:
            cycles.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_longer_than_700_lines(path):
    assert len(path.read_text().splitlines()) <= 700


@pytest.mark.parametrize("file, functions", LOOPS.items())
def test_each_lanes_loop_fits_on_a_screen(file, functions):
    tree = ast.parse((ROOT / file).read_text())
    lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name in functions}
    assert set(lengths) == set(functions)
    assert all(length <= 80 for length in lengths.values()), lengths
