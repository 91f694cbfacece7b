"""The package's layering: nothing imports a layer above its own, and export and runtime do not import each other.

    1 maths and config      errors, config, rotation, names, legacy_tokenizers (data)
    2 ONNX ops and I/O      ops, files, checks, adapter_files, swap, inspection, model_dir, quantize,
                            native (the road ops' kernel library), ort_session (the one onnxruntime session set-up)
    3 passes                passes.*, attach, builder_graph
    4 export (torch)        layers, model, adapters, zoo, source, checkpoint, export.*
    4 runtime (ORT)         runtime, generation, seq2seq, gpu, kvcache, sessions
    5 harness, CLI, server  parity.*, verify, crosscheck, testing, application, cli, cli_common, serving.*,
                            genai_builder

A module may import its own layer and any layer below; the two halves of layer 4 are siblings. Lazy imports inside
functions count too. Layers 1-3 and the runtime are the serving floor: they must not import torch, transformers or
peft at all, except the two listed places that take a torch tensor or a torch pickle when one is handed to them.

No import circles between the package's modules: every import counts (at the top, inside functions, under
`if TYPE_CHECKING:`), each resolved to the module it names (`from road_export.export import capture` is an edge to
`road_export.export.capture`), and any strongly connected set of two or more modules fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "road_export"

LAYERS: dict[str, tuple[int, str]] = {
    **{m: (1, "base") for m in ("errors", "config", "rotation", "names", "requires_export", "legacy_tokenizers")},
    **{m: (2, "onnx") for m in ("ops", "files", "checks", "adapter_files", "swap", "inspection", "model_dir",
                                "quantize", "native", "ort_session")},
    **{m: (3, "passes") for m in ("passes", "attach", "builder_graph")},
    **{m: (4, "export") for m in ("layers", "model", "adapters", "zoo", "source", "checkpoint", "export")},
    **{m: (4, "runtime") for m in ("runtime", "generation", "seq2seq", "gpu", "kvcache", "sessions")},
    **{m: (5, "top") for m in ("parity", "verify", "crosscheck", "testing", "application", "cli", "cli_common",
                               "serving", "genai_builder")},
}
FLOOR_MAX = 3
TORCH_SIDE = ("torch", "transformers", "peft", "safetensors.torch")
TORCH_ALLOWED = {"road_export.rotation": {"torch"}, "road_export.adapter_files": {"torch"}}


def layer_of(module: str) -> tuple[int, str] | None:
    """The layer of `road_export.x.y` (by its first component), None for the package root."""
    parts = module.split(".")
    if parts == ["road_export"]:
        return None
    return LAYERS.get(parts[1], (0, "unknown"))


def imports(module: str, source: str) -> list[str]:
    """Every module `source` imports (absolute names), lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "road_export":  # `from road_export import ops` names a submodule, or __version__
                for alias in node.names:
                    submodule = (PACKAGE / f"{alias.name}.py").is_file() or (PACKAGE / alias.name).is_dir()
                    if alias.name != "__version__":
                        found.append(f"road_export.{alias.name}" if submodule else "road_export")
            else:
                found.append(node.module)
    return found


def violations(sources: dict[str, str]) -> list[str]:
    problems = []
    for module, source in sources.items():
        mine = layer_of(module)
        if mine is None:
            continue
        if mine[1] == "unknown":
            problems.append(f"{module}: not in the layer table; add it to tests/test_layering.py LAYERS")
            continue
        for target in imports(module, source):
            torch_side = any(target == t or target.startswith(t + ".") for t in TORCH_SIDE)
            if torch_side and (mine[0] <= FLOOR_MAX or mine[1] == "runtime"):
                if target.split(".")[0] not in TORCH_ALLOWED.get(module, set()):
                    problems.append(f"{module} (layer {mine[0]}) imports {target}: the serving floor is torch-free")
                continue
            if not target.startswith("road_export"):
                continue
            theirs = layer_of(target)
            if theirs is None and mine[0] < 5:
                problems.append(f"{module} imports the package root: import the module that defines the name")
            elif theirs is None:
                continue  # the top layer may use the package's lazy facade
            elif theirs[0] > mine[0]:
                problems.append(f"{module} (layer {mine[0]}) imports {target} (layer {theirs[0]})")
            elif theirs[0] == mine[0] == 4 and theirs[1] != mine[1]:
                problems.append(f"{module} ({mine[1]}) imports {target} ({theirs[1]}): export and runtime are siblings")
    return problems


def package_sources(root: Path = ROOT, package: str = "road_export") -> dict[str, str]:
    """{dotted module name: source} of every `.py` file of `root / package` (a package's `__init__` by its name)."""
    sources = {}
    for path in (root / package).rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        sources[name] = path.read_text()
    return sources


def test_no_module_imports_a_higher_layer():
    sources = package_sources()
    assert "road_export.runtime" in sources and "road_export.passes.pipeline" in sources
    assert violations(sources) == []


def test_the_check_catches_each_kind_of_violation():
    planted = {
        "road_export.ops": "from road_export.runtime import RoadSession\n",  # upward
        "road_export.generation": "def f():\n    from road_export.export import tasks\n",  # sibling, lazily
        "road_export.passes.fuse": "import torch\n",  # torch on the floor
        "road_export.runtime": "from transformers import AutoConfig\n",
        "road_export.files": "from road_export import RoadError\n",  # the root
        "road_export.newthing": "import numpy\n",  # unmapped
        "road_export.swap": "from safetensors.torch import load_file\n",
    }
    found = violations(planted)
    assert len(found) == len(planted), found
    assert violations({"road_export.rotation": "def f():\n    import torch\n",
                       "road_export.attach": "from road_export.passes import common\nfrom road_export import ops\n",
                       "road_export.export.exporter": "from road_export import swap\n"}) == []


# TEMPORARY, being removed on branch `runtime` (RoadSession, the CUDA path and the seq2seq session become one runtime
# core there). The lead deletes this allow-list at that merge; test_no_import_circles fails once the circle is gone,
# so it cannot outlive the circle. Add nothing here.
def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    """{module: the package modules it imports}, every import statement counted (lazy and type-checking ones too),
    relative imports resolved; `from p import name` is an edge to `p.name` when that is a module, else to `p`."""
    modules = set(sources)
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        is_package = any(other.startswith(module + ".") for other in modules)
        targets = set()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[:len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for name in names:
                while name and name not in modules:  # `import a.b.c` of a name inside a module: that module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two or more modules (Tarjan), each sorted, sorted by their first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(found)


def test_no_import_circles():
    circles = import_circles(import_graph(package_sources()))
    assert circles == [], "import circles (lazy imports count)"


def test_the_circle_finder_catches_a_planted_lazy_circle(tmp_path):
    """A synthetic package: a -> sub.b at the top, sub.b -> a only inside a function (lazily), c -> a under
    TYPE_CHECKING and sub.d -> c relatively; the finder reports the one circle {a, sub.b}, and with sub.b's lazy
    import gone, none. Then a type-checking-only back edge (a -> c) makes a second circle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "def f():\n    from pkg.a import g\n    return g\n",
        "c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n",
        "sub/d.py": "from .. import c\nfrom . import b\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    sources = package_sources(tmp_path, "pkg")
    graph = import_graph(sources)
    assert graph["pkg.sub.d"] == {"pkg.c", "pkg.sub.b"}
    assert import_circles(graph) == [["pkg.a", "pkg.sub.b"]]
    assert import_circles(import_graph({**sources, "pkg.sub.b": "def f():\n    return 1\n"})) == []
    sources["pkg.a"] += "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\n"
    assert import_circles(import_graph(sources)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
