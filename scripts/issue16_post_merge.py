"""One-off helper for merging work written against the old flat layout into the issue-16
layout (delete this file once main is merged). Run from the repository root after
``git merge`` (conflicts resolved):

    python scripts/issue16_post_merge.py          # moves new flat modules, rewrites imports

It ``git mv``s modules that appeared at the old places (``harp_vllm/plan*.py``,
``costs.py``, ``damage.py`` -> ``harp_vllm/pruning/``; ``harp_vllm/cli_*.py`` ->
``harp_vllm/cli/``) and rewrites every import of a moved module or name in ``harp_vllm/``,
``tests/`` and ``benchmarks/``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "harp_vllm"
OLD_TO_NEW = {
    "reference": "pruning.reference", "search": "pruning.search",
    "gate_norm": "pruning.gate_norm", "heads": "pruning.heads",
    "structured": "pruning.structured", "linear": "pruning.linear",
    "checkpoint": "pruning.checkpoint", "prune": "pruning.prune",
    "perplexity": "evaluation.perplexity", "data": "evaluation.data",
    "tasks": "evaluation.tasks", "serve": "serving.serve",
    "stat_logger": "serving.stat_logger", "serving_metrics": "serving.metrics",
    "stack": "ops.stack", "cli_serving": "cli.serving", "cli_stack": "cli.stack",
    "cli_tasks": "cli.tasks", "cli_loadtest": "cli.loadtest",
}
# names that moved between modules: (old module, name) -> new module
NAME_MOVES = {
    ("heads", "head_dim"): "families", ("spec", "HARP_ARCHITECTURES"): "families",
    ("cli", "run_guarded"): "cli.errors", ("cli", "fail"): "cli.errors",
    ("cli", "console"): "cli.errors",
}
TOP = {"errors", "paths", "models", "families", "spec", "process", "cli", "vllm_plugin",
       "gateway", "loadtest", "pruning", "evaluation", "serving", "ops"}


def git(*args: str) -> None:
    subprocess.run(["git", *args], cwd=ROOT, check=True)


def move_new_flat_modules() -> None:
    for p in sorted(PKG.glob("*.py")):
        stem = p.stem
        if stem in TOP or stem == "__init__":
            continue
        if stem.startswith("cli_"):
            OLD_TO_NEW[stem] = f"cli.{stem[4:]}"
        else:
            OLD_TO_NEW[stem] = f"pruning.{stem}"
        git("mv", str(p.relative_to(ROOT)), "harp_vllm/" + OLD_TO_NEW[stem].replace(".", "/")
            + ".py")
        print(f"moved harp_vllm/{stem}.py -> harp_vllm/{OLD_TO_NEW[stem].replace('.', '/')}.py")


def new_abs(old: str) -> str:
    """'harp_vllm.heads' -> 'harp_vllm.pruning.heads' (unchanged if it did not move)."""
    parts = old.split(".")
    if len(parts) > 1 and parts[0] == "harp_vllm" and parts[1] in OLD_TO_NEW:
        return ".".join(["harp_vllm", OLD_TO_NEW[parts[1]], *parts[2:]])
    return old


def rel(cur: list[str], target: str) -> str:
    t = target.split(".")
    i = 0
    while i < len(cur) and i < len(t) and cur[i] == t[i]:
        i += 1
    return "." * (len(cur) - i + 1) + ".".join(t[i:])


IMPORT = re.compile(r"^(\s*)from (\.*)([\w.]*) import (\(?[^\n]*)$", re.M)


def fix_file(path: Path, old_pkg: list[str] | None) -> None:
    """Rewrite imports; ``old_pkg``: the package the file sat in before any move (relative
    imports are resolved there), None for files outside harp_vllm (absolute imports only)."""
    text = path.read_text()
    new_pkg = list(path.relative_to(ROOT).with_suffix("").parts[:-1])

    def sub(m: re.Match) -> str:
        indent, dots, module, names = m.groups()
        if dots:
            if old_pkg is None:
                return m.group(0)
            base = old_pkg[: len(old_pkg) - (len(dots) - 1)]
            old = ".".join(base + ([module] if module else []))
        elif module.startswith("harp_vllm"):
            old = module
        else:
            return m.group(0)
        short = old.split(".", 1)[1] if "." in old else ""
        moved = [n.strip() for n in names.strip("()").split(",") if n.strip()
                 and (short, n.strip().split(" as ")[0]) in NAME_MOVES]
        target = new_abs(old)
        if old == "harp_vllm" and names.split(" as ")[0].strip() in OLD_TO_NEW:
            name = names.split(" as ")[0].strip()
            mod, _, leaf = ("harp_vllm." + OLD_TO_NEW[name]).rpartition(".")
            names = names.replace(name, leaf, 1)
            target = mod
        lines = []
        if moved:
            keep = [n for n in names.strip("()").split(",") if n.strip() and n.strip() not in moved]
            for n in moved:
                dest = "harp_vllm." + NAME_MOVES[(short, n.split(" as ")[0])]
                src = rel(new_pkg, dest) if dots else dest
                lines.append(f"{indent}from {src} import {n}")
            if not keep:
                return "\n".join(lines)
            names = ", ".join(k.strip() for k in keep)
        src = rel(new_pkg, target) if dots else target
        return "\n".join([f"{indent}from {src} import {names}", *lines])

    new = IMPORT.sub(sub, text)
    if new != text:
        path.write_text(new)
        print(f"rewrote imports in {path.relative_to(ROOT)}")


def main() -> None:
    before = {p: list(p.relative_to(ROOT).with_suffix("").parts[:-1])
              for p in PKG.glob("*.py")}
    move_new_flat_modules()
    for p in sorted(PKG.rglob("*.py")):
        old_pkg = None
        for q, pkg in before.items():
            if q.stem != "__init__" and q.stem in OLD_TO_NEW and p.stem == OLD_TO_NEW[
                    q.stem].split(".")[-1] and p.parent.name == OLD_TO_NEW[q.stem].split(".")[0]:
                old_pkg = pkg
        fix_file(p, old_pkg if old_pkg is not None else
                 list(p.relative_to(ROOT).with_suffix("").parts[:-1]))
    for d in ("tests", "benchmarks"):
        for p in sorted((ROOT / d).rglob("*.py")):
            fix_file(p, None)
    print("now: ruff check --fix . && mypy && the fast tests")


if __name__ == "__main__":
    main()
