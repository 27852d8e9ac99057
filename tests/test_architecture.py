"""The shape of the code: one home per concept, no cycles between stage packages, no private names across
packages, and each stage package importable on its own."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

SRC = REPO / "src" / "opensem"
PACKAGES = sorted(p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p.name != "assets")


def unit(module: str) -> str:
    """opensem.train.recipe -> train; opensem.adapters -> adapters."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports() -> list[tuple[str, str, list[str], int]]:
    """(importing module, imported opensem module, names, line): every import, at the top or inside a function."""
    out = []
    for path in SRC.rglob("*.py"):
        if "assets" in path.parts:
            continue
        mod = ".".join(("opensem", *path.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("opensem"):
                names = [a.name for a in node.names]
                if node.module == "opensem":  # from opensem import x: x may be a module
                    out += [(mod, f"opensem.{n}", [], node.lineno) for n in names]
                else:
                    out.append((mod, node.module, names, node.lineno))
            elif isinstance(node, ast.Import):
                out += [(mod, a.name, [], node.lineno) for a in node.names if a.name.startswith("opensem.")]
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for src, dst, _, _ in imports():
        a, b = unit(src), unit(dst)
        if a in graph and b in graph and a != b:
            graph[a].add(b)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        path.pop()
        state[n] = 2
        return []

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return []


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert {"forge", "judge", "train", "cpt", "prefs", "export", "kernel", "llm"} <= set(graph)
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)
    # the training kernel serves the recipes and knows none of them
    assert not graph["kernel"] & {"train", "cpt", "prefs", "forge", "judge", "export"}, graph["kernel"]
    # lineage has one home: no stage package reads another's adapter folders through that stage
    users_of_train = sorted(unit(s) for s, d, _, _ in imports() if d.startswith("opensem.train.") and unit(s) != "train")
    assert users_of_train == [], users_of_train


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_private_name_is_imported_across_packages():
    bad = [f"{s}:{line} imports {d}.{n}" for s, d, names, line in imports() for n in names
           if n.startswith("_") and not n.startswith("__") and unit(s) != unit(d)]
    assert not bad, bad


def test_each_stage_package_imports_alone():
    """A fresh interpreter per package: no package needs another imported first to break a cycle."""
    for pkg in ("forge", "judge", "train", "cpt", "prefs", "export", "launch", "kernel", "llm"):
        for mod in (f"opensem.{pkg}", *(f"opensem.{pkg}.{p.stem}" for p in (SRC / pkg).glob("*.py") if p.stem != "__init__")):
            r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, f"import {mod}: {r.stderr[-1500:]}"


def test_every_opensem_import_in_src_tests_and_bench_resolves():
    """A name moved or renamed is caught here, in the benchmarks and tests too, not when someone runs them."""
    import importlib

    bad = []
    for root in (SRC, REPO / "tests", REPO / "bench"):
        for path in root.rglob("*.py"):
            if "assets" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("opensem")):
                    continue
                module = importlib.import_module(node.module)
                for alias in node.names:
                    if alias.name == "*" or hasattr(module, alias.name):
                        continue
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        bad.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, bad


def test_one_rule_says_which_runs_are_finished_for_every_finder(tmp_path):
    """The adapter, cpt and export finders agree: a run cut short (status running or interrupted, or no weights) is
    never picked as "the latest", however new it is."""
    import json
    import os

    from opensem.adapters import find_adapter, find_finished, is_finished
    from opensem.export.stage import find_run
    from opensem.workspace import Workspace, init_workspace

    init_workspace(tmp_path)
    ws = Workspace(tmp_path)

    def run(name: str, created: str, status: str | None, weights: bool = True):
        d = tmp_path / "models/adapters" / name
        d.mkdir(parents=True)
        (d / "adapter_config.json").write_text("{}")
        (d / "manifest.json").write_text(json.dumps({"created": created, "run_name": name}))
        if weights:
            (d / "adapter_model.safetensors").write_bytes(b"w")
        if status:
            (d / "run.json").write_text(json.dumps({"status": status}))
        return d

    done = run("done", "2026-01-01T00:00:00", "complete")
    old = run("old", "2025-01-01T00:00:00", None)  # from before status files: complete
    cut = run("cut", "2027-01-01T00:00:00", "interrupted")
    run("busy", "2027-01-02T00:00:00", "running")
    run("noweights", "2027-01-03T00:00:00", "complete", weights=False)
    os.utime(cut, None)
    assert [is_finished(d) for d in (done, old, cut)] == [True, True, False]
    assert find_adapter(ws, ws.train_config(), None) == done.resolve()
    assert find_run(ws, None) == done.resolve()
    assert find_finished(tmp_path / "models/adapters", None, "run", "opensem train") == done.resolve()
