"""The package's layout rules (issue 27), checked on the source: no module over 400 lines,
no two modules with one file name, imports only down the flow, and no benchmark or script
that imports from tests/ (running a test double by path, as bench_gateway runs
fake_backend.py, is not importing it). Reads files only (fast; no model, no vLLM)."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "harp_vllm"
MAX_LINES = 400

# The flow, top to bottom: a module may import its own part and the parts listed before it
# (the shared modules first, each of which may import the shared modules before it).
SHARED = ("errors", "paths", "families", "spec_parts", "spec", "models", "process")
PARTS = ("evaluation", "pruning", "vllm_plugin", "serving", "gateway", "loadtest", "ops", "cli")
# Inside pruning/: the shared modules, the reference, then calibration, methods, planner, jobs.
PRUNING = ("heads", "costs", "selection", "reference", "calibration", "methods", "planner",
           "jobs")


def modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported(path: Path) -> set[str]:
    """The harp_vllm modules (or names in them) ``path`` imports, anywhere in the file."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            out.update([mod] if node.module else [f"{mod}.{a.name}" for a in node.names])
    return {m for m in out if m.split(".")[0] == "harp_vllm"}


def rank(name: list[str]) -> tuple[int, int]:
    """(place in the flow, place inside pruning/) of a module or imported name."""
    top = name[1] if len(name) > 1 else ""
    if top in SHARED:
        return SHARED.index(top) - len(SHARED), 0
    if top not in PARTS:
        return -len(SHARED) - 1, 0  # the package's own __init__
    inner = name[2] if top == "pruning" and len(name) > 2 and name[2] in PRUNING else None
    return PARTS.index(top), -1 if inner is None else PRUNING.index(inner)


def test_no_module_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_two_modules_share_a_file_name():
    names = Counter(p.name for p in modules() if p.name not in ("__init__.py", "__main__.py"))
    assert not [n for n, k in names.items() if k > 1], names.most_common(3)


def test_every_part_of_the_package_is_placed_in_the_flow():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()}
    assert tops - {"__init__"} <= set(SHARED) | set(PARTS)
    inner = {p.relative_to(PACKAGE / "pruning").parts[0].removesuffix(".py")
             for p in (PACKAGE / "pruning").rglob("*.py")}
    assert inner - {"__init__"} <= set(PRUNING)


def test_imports_go_down_the_flow_only():
    upward = []
    for path in modules():
        me = module_name(path)
        for target in imported(path):
            them = target.split(".")
            if rank(them) > rank(me) and them[:len(me)] != me:
                upward.append(f"{'.'.join(me)} -> {target}")
    assert not upward, "imports up the flow:\n" + "\n".join(sorted(upward))


def test_the_flow_check_sees_an_upward_import():
    assert rank(["harp_vllm", "models"]) < rank(["harp_vllm", "pruning", "reference"])
    assert rank(["harp_vllm", "pruning", "reference"]) < rank(["harp_vllm", "pruning", "jobs"])
    assert rank(["harp_vllm", "serving", "serve"]) > rank(["harp_vllm", "vllm_plugin"])
    assert rank(["harp_vllm", "cli"]) > rank(["harp_vllm", "ops", "stack"])


def test_benchmarks_and_scripts_import_nothing_from_tests():
    tests = {p.stem for p in (REPO / "tests").glob("*.py")}
    bad = []
    for path in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "scripts").glob("*.py")]):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}: {n}" for n in names if n.split(".")[0] in tests]
        for node in ast.walk(ast.parse(text)):  # sys.path.insert(0, ".../tests"), append
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    ast.unparse(node.func.value) == "sys.path" and \
                    "tests" in ast.unparse(node):
                bad.append(f"{path.name}: puts tests/ on sys.path")
    assert not bad, bad
