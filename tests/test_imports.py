"""The package's import structure: no import circles inside samvit (imports inside functions included), every
module importable on its own in a fresh process, and a start-up that does not need torch."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import samvit

ROOT = Path(samvit.__file__).parent


def _modules() -> Dict[str, Path]:
    """Every module of samvit: dotted name -> file."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> Dict[str, Set[str]]:
    """module -> the samvit modules it imports (anywhere in its code, relative imports resolved)."""
    mods = _modules()
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if t in mods and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle as [a, b, ..., a], or [] when the graph is acyclic."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(m: str) -> List[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circles_inside_samvit():
    graph = import_graph()
    assert "samvit.checkpoints.load" in graph and "samvit.checkpoints.files" in graph["samvit.checkpoints.load"]
    cycle = find_cycle(graph)
    assert not cycle, "import circle: " + " -> ".join(cycle)


_ISOLATED = r"""
import importlib, os, sys, traceback
import numpy, PIL.Image, safetensors.torch, torch, tqdm  # third-party only: samvit's own import order stays fresh
failed = []
for name in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:  # a fresh child per module: nothing of samvit imported yet
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    if os.waitpid(pid, 0)[1] != 0:
        failed.append(name)
print("FAILED", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_on_its_own():
    """Each module imported first, alone, in its own forked child of a process that has imported no samvit."""
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    proc = subprocess.run([sys.executable, "-c", _ISOLATED, *names], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT.parent)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.strip() == "FAILED"


_NO_TORCH = r"""
import sys
import samvit
assert "torch" not in sys.modules, "import samvit imported torch"
from samvit.cli import main
for argv in (["--version"], ["--help"], ["embed", "--help"], ["segment", "--help"], ["bench", "--help"]):
    try:
        main(argv)
    except SystemExit:
        pass
    assert "torch" not in sys.modules, f"samvit {' '.join(argv)} imported torch"
samvit.EncoderConfig  # configs are data: still no torch
assert "torch" not in sys.modules
samvit.ImageEncoder
assert "torch" in sys.modules
print("OK")
"""


def test_import_and_help_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT.parent)))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_every_public_name_resolves():
    fresh = samvit
    for name in fresh.__all__:
        assert getattr(fresh, name) is not None, name
    assert set(fresh.__all__) <= set(dir(fresh))
    for old in ("load_encoder", "Predictor", "EmbeddingStore", "preprocess", "load_image", "ImageEncoder",
                "load_decoder", "resolve_checkpoint", "download_checkpoint", "convert_checkpoint", "save_encoder",
                "AutomaticMaskGenerator", "PromptError", "CheckpointError", "ImageError", "PreparedImage",
                "export_onnx", "tune_allocator", "PRESETS", "EncoderConfig", "preset", "__version__"):
        assert old in fresh.__all__, old
    try:
        fresh.no_such_name
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:
        raise AssertionError("an unknown name should raise AttributeError")


def test_readme_layout_names_every_module():
    """The README's Layout tree lists every module and folder of src/samvit, and nothing that is not there."""
    import re

    readme = (ROOT.parent.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed, folder = set(), ""
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        names = re.findall(r"\w+\.py|\w+/", line.strip().split("  ")[0])
        if indent == 2:
            folder = names[0] if names and names[0].endswith("/") else ""
            listed.update(names)
        elif indent > 2:
            listed.update(folder + n for n in names)
    actual = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    actual |= {str(p.relative_to(ROOT)) + "/" for p in ROOT.iterdir() if p.is_dir() and p.name != "__pycache__"}
    actual |= {"__init__.py"}
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))
    assert re.search(r"cli/ +argparse only", block)


def _layout_order() -> List[str]:
    """The README's Layout entries in order: top-level modules and folders ("config.py", "modeling/") and the
    files listed under a folder ("modeling/kernels.py")."""
    import re

    readme = (ROOT.parent.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    order, folder = [], ""
    for line in block.splitlines()[1:]:
        indent = len(line) - len(line.lstrip())
        names = re.findall(r"\w+\.py|\w+/", line.strip().split("  ")[0])
        if indent == 2:
            folder = names[0] if names and names[0].endswith("/") else ""
            order.extend(names)
        elif indent > 2:
            order.extend(folder + n for n in names)
    return order


def _entry(module: str, depth: int) -> str:
    """The Layout entry of a module at depth 1 ("modeling/") or 2 ("modeling/kernels.py")."""
    parts = module.split(".")[1:]
    if len(parts) < depth:
        return ""
    path = "/".join(parts[:depth])
    return path + "/" if (ROOT / path).is_dir() else path + ".py"


# folders whose files the README lists as layers (each file imports only files listed above it)
LAYERED_FOLDERS = ("modeling/", "checkpoints/", "embeddings/", "inspect/", "export/")


def test_imports_point_down_the_readme_layout():
    """Every module imports only what the README's Layout lists above it (the package root, which re-exports
    lazily, excepted): the top-level entries, and the files inside the layered folders."""
    rank = {name: i for i, name in enumerate(_layout_order())}
    wrong = []
    for mod, deps in import_graph().items():
        for depth in (1, 2):
            a = _entry(mod, depth)
            if a not in rank or a == "__init__.py" or (depth == 2 and not a.startswith(LAYERED_FOLDERS)):
                continue
            for dep in deps:
                b = _entry(dep, depth)
                same_scope = depth == 1 or b.split("/")[0] == a.split("/")[0]
                if b in rank and b != a and same_scope and rank[b] > rank[a]:
                    wrong.append(f"{mod} imports {dep} ({a} is listed above {b})")
    assert not wrong, "\n".join(sorted(set(wrong)))
    assert rank["modeling/kernels.py"] < rank["modeling/attention.py"] < rank["modeling/encoder.py"]
