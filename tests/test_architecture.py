"""The shape of dsd_core: no import cycles, no ComfyUI imports, one assembly path, the diffusers adapter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

CORE = os.path.join(ROOT, "dsd_core")


def _modules() -> dict[str, str]:
    """dsd_core module name -> file."""
    found = {}
    for folder, _, files in os.walk(CORE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
                found[rel.removesuffix(".__init__")] = os.path.join(folder, f)
    return found


def _imports(name: str, path: str, modules: dict) -> set[str]:
    """Every dsd_core module ``name`` imports, at module level or inside functions (lazy imports count too)."""
    is_package = path.endswith("__init__.py")
    package = name if is_package else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in names:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target.startswith("dsd_core"):
                # importing a.b.c runs a.b's __init__ first, unless a.b is a package this module belongs to
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    dep = ".".join(parts[:i])
                    if dep in modules and not name.startswith(dep + ".") and dep != name:
                        targets.add(dep)
    return targets


def test_import_graph_has_no_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert graph["dsd_core.pipeline"] and "dsd_core.loading" not in graph["dsd_core.pipeline"]


def _calls(function: str) -> list[str]:
    """``file:line`` of every call of ``function`` in dsd_core (not its definition)."""
    hits = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                if called == function:
                    hits.append(f"{name}:{node.lineno}")
    return hits


@pytest.mark.parametrize("function", ["load_dsd_lora", "apply_memory", "apply_speed"])
def test_one_assembly_path(function):
    """The LoRA is loaded, memory and speed are applied in exactly one place: the assembler."""
    assert [c.split(":")[0] for c in _calls(function)] == ["dsd_core.assembly"], _calls(function)


def test_dsd_core_never_imports_comfyui(tmp_path):
    """Importing every dsd_core module and running CLI commands pulls in no ComfyUI module."""
    code = f"""
import importlib, os, sys
root = {ROOT!r}
for folder, _, files in os.walk(os.path.join(root, "dsd_core")):
    for f in files:
        if f.endswith(".py") and f != "__main__.py":
            name = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            importlib.import_module(name)
from dsd_core.cli import main
assert main(["memory"]) == 0
assert main(["-q", "tiny-model", {str(tmp_path / "tiny")!r}]) == 0
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("comfy", "folder_paths", "nodes", "comfy_extras",
                                                              "server", "execution"))
assert not leaked, leaked
print("OK")
"""
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), env=env,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


# ---------------------------------------------------------------------------------------------- diffusers adapter
def test_diffusers_compat_against_the_pinned_diffusers():
    from dsd_core import diffusers_compat as dc

    x = torch.randn(2, 16, 8, 12)
    packed = dc.pack_latents(x)
    assert packed.shape == (2, 4 * 6, 64)
    assert torch.equal(packed[0, 1], x[0, :, 0:2, 2:4].reshape(16, 4).reshape(-1))  # token r*(w/2)+c, ch*4+dy*2+dx
    assert torch.equal(dc.unpack_latents(packed, 64, 96, 8), x)
    ids = dc.latent_image_ids(4, 6, "cpu", torch.float32)
    assert ids.shape == (24, 3) and ids[7].tolist() == [0.0, 1.0, 1.0]
    assert dc.attention_backend_problem("native") is None
    missing = [b for b in ("flash", "sage", "xformers") if dc.attention_backend_problem(b) is not None]
    for name in missing:
        assert "\n" not in dc.attention_backend_problem(name)
