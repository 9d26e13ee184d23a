"""The import graph of ``fastdd/`` (static: AST of every module, module- and function-level imports,
relative imports resolved) is acyclic and respects the layers of ``shared/design.md``: imports point
down, never from a lower layer to a higher one."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "fastdd"

# higher number = higher layer; a module may import only modules of a layer <= its own (same layer: no cycle)
LAYERS = {
    "fastdd": 0,  # the package __init__ (only __version__; imports nothing)
    "fastdd.cli": 6,
    "fastdd.__main__": 6,  # python -m fastdd -> the CLI
    "fastdd.cliflags": 6,  # argparse flags from config dataclasses, for the CLI
    "fastdd.compat": 6,  # the reference-code drop-in: sits on top, like the CLI
    "fastdd.continual": 6,  # drives methods and evaluation, like the CLI
    "fastdd.methods": 5,
    "fastdd.plugins": 4,  # plugin configs / validators: below methods, may use matchers and lower
    "fastdd.matchers": 4,
    "fastdd.ops": 3,
    "fastdd.kernels": 2,
    "fastdd.models": 1,
    "fastdd.data": 1,
    "fastdd.augment": 1,
    "fastdd.idc": 1,  # augmentation / decoding helpers, like augment
    "fastdd.experts": 1,  # loads pre-trained models (used by DANCE)
    "fastdd.crops": 1,  # SRe2L jitter, crop/flip, MixUp helpers (like augment)
    "fastdd.teacher": 1,  # BN teachers for SRe2L/DWA and KD: squeeze directories, torchvision state dicts
    "fastdd.squeeze": 1,  # trains a BN teacher (like experts)
    "fastdd.kd": 1,  # soft-label KD loss, MixUp, optimiser groups (used by evaluate)
    "fastdd.relabel": 1,  # stored FKD-style soft labels: draws, epoch files, replay Dataset / Sampler (used by evaluate)
    "fastdd.evaluate": 1,  # trains models on a set; imports models, data, augment, idc
    "fastdd.checkpoint": 1,
    "fastdd.distributed": 1,  # torchrun process group (torch.distributed), barriers, the test kill hook
    "fastdd.synset": 1,
    "fastdd.compile": 1,  # torch.compile helpers used by models' callers (methods, evaluate)
    "fastdd.theory": 1,  # the multi-index study: torch/numpy only
    "fastdd.validation": 0,
    "fastdd.errors": 0,
    "fastdd.devices": 0,
    "fastdd.allocator": 0,  # glibc malloc settings for the long loops (ctypes only)
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict:
    """{module name: path} of every ``.py`` under fastdd/ (the kernels symlink included)."""
    return {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def imported(name: str, path: Path, known: set) -> set:
    """The fastdd modules ``name`` imports anywhere in its body (``from X import y`` counts ``X.y`` when
    that is a module, else ``X``)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import fastdd.ops.x.y` -> the deepest known module
                t = t.rpartition(".")[0]
            if t and t.startswith("fastdd") and t != name:
                out.add(t)
    return out


def graph() -> dict:
    mods = modules()
    known = set(mods)
    return {name: imported(name, path, known) for name, path in mods.items()}


def layer(name: str):
    """The layer of a module: the longest prefix in LAYERS (None: a module the design does not place)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS and (i > 1 or len(parts) == 1):  # "fastdd" itself places only the package
            return LAYERS[key]
    return None


def find_cycle(g: dict):
    """One import cycle as a list of modules, or None."""
    state: dict = {}
    stack: list = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_graph_sees_relative_and_function_level_imports():
    g = graph()
    assert "fastdd.validation" in g["fastdd.data.dataset"]  # `from ..validation import ...`
    assert "fastdd.ops.class_mmd" in g["fastdd.matchers.mmd"]


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_has_a_layer():
    assert [name for name in graph() if layer(name) is None] == []


def test_imports_point_down_the_layers():
    g = graph()
    bad = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
           for a, targets in sorted(g.items()) for b in sorted(targets)
           if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert not bad, "\n".join(bad)
