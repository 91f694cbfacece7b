"""The package's layering: each layer is a folder, nothing imports a layer above its own, export and runtime do
not import each other, and there are no import circles.

    1 core      maths and config               road_export/core/
    2 graph     ONNX ops and I/O, torch-free   road_export/graph/ (with native/, the kernels, and ort_session)
    3 passes    graph passes (onnx-ir)         road_export/passes/
    4 export    torch                          road_export/export/
    4 runtime   onnxruntime                    road_export/runtime/
    5 app       harness, CLI, server           road_export/app/

A module's layer is its folder; every module lives in one (only the package's facade `__init__` and `__main__` sit
at the top). A module may import its own layer and any layer below; the two halves of layer 4 are siblings. Lazy
imports inside functions count too. Layers 1-3 and the runtime are the serving floor: they must not import torch,
transformers or peft at all, except the two listed places that take a torch tensor or a torch pickle when one is
handed to them.

No import circles between the package's modules: every import counts (at the top, inside functions, under
`if TYPE_CHECKING:`), each resolved to the module it names (`from road_export.export import capture` is an edge to
`road_export.export.capture`), and any strongly connected set of two or more modules fails the test.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "road_export"

FOLDERS: dict[str, tuple[int, str]] = {
    "core": (1, "core"),
    "graph": (2, "graph"),
    "passes": (3, "passes"),
    "export": (4, "export"),
    "runtime": (4, "runtime"),
    "app": (5, "app"),
}
TOP_FILES = {"__init__.py": None, "__main__.py": (5, "app")}  # the facade; `python -m road_export` runs the CLI
FLOOR_MAX = 3
TORCH_SIDE = ("torch", "transformers", "peft", "safetensors.torch")
TORCH_ALLOWED = {"road_export.core.rotation": {"torch"}, "road_export.graph.adapter_files": {"torch"}}


def layer_of(module: str) -> tuple[int, str] | None:
    """The layer of `road_export.folder.x` (its folder), None for the package root."""
    parts = module.split(".")
    if parts == ["road_export"]:
        return None
    if len(parts) == 2 and f"{parts[1]}.py" in TOP_FILES:
        return TOP_FILES[f"{parts[1]}.py"]
    return FOLDERS.get(parts[1], (0, "unknown"))


def imports(module: str, source: str) -> list[str]:
    """Every module `source` imports (absolute names), lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "road_export":  # `from road_export import core` names a folder, else the facade
                for alias in node.names:
                    if alias.name != "__version__":
                        found.append(f"road_export.{alias.name}" if alias.name in FOLDERS else "road_export")
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
            problems.append(f"{module}: not in a layer folder; move it into one of {', '.join(FOLDERS)}")
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


def strays(package_dir: Path = PACKAGE) -> list[str]:
    """What sits at the top of the package outside the layer folders: modules, packages, folders of modules."""
    found = []
    for entry in sorted(package_dir.iterdir()):
        if entry.name in FOLDERS or entry.name in TOP_FILES or entry.name == "__pycache__":
            continue
        if entry.suffix == ".py" or (entry.is_dir() and any(entry.rglob("*.py"))):
            found.append(entry.name)
    return found


def test_no_module_imports_a_higher_layer():
    sources = package_sources()
    assert "road_export.runtime" in sources and "road_export.passes.pipeline" in sources
    assert violations(sources) == []


def test_every_module_lives_in_a_layer_folder():
    assert strays() == [], "move these into a layer folder (and into FOLDERS' map of the docstring)"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(FOLDERS)


def test_the_folder_check_catches_a_stray_module(tmp_path):
    """A stray module and a stray package at the top of a synthetic package are found; the folders, the facade,
    `__main__` and py.typed are not."""
    pkg = tmp_path / "road_export"
    for folder in FOLDERS:
        (pkg / folder).mkdir(parents=True)
        (pkg / folder / "__init__.py").write_text("")
    for name in ("__init__.py", "__main__.py", "py.typed"):
        (pkg / name).write_text("")
    assert strays(pkg) == []
    (pkg / "newthing.py").write_text("import numpy\n")
    (pkg / "oldpkg").mkdir()
    (pkg / "oldpkg" / "__init__.py").write_text("")
    assert strays(pkg) == ["newthing.py", "oldpkg"]
    assert violations(package_sources(tmp_path)) == ["road_export.newthing: not in a layer folder; move it into "
                                                     "one of core, graph, passes, export, runtime, app",
                                                     "road_export.oldpkg: not in a layer folder; move it into "
                                                     "one of core, graph, passes, export, runtime, app"]


def test_the_check_catches_each_kind_of_violation():
    planted = {
        "road_export.graph.ops": "from road_export.runtime.session import RoadSession\n",  # upward
        "road_export.runtime.generation": "def f():\n    from road_export.export import tasks\n",  # sibling, lazily
        "road_export.passes.fuse": "import torch\n",  # torch on the floor
        "road_export.runtime.session": "from transformers import AutoConfig\n",
        "road_export.graph.files": "from road_export import RoadError\n",  # the root
        "road_export.newthing": "import numpy\n",  # not in a folder
        "road_export.graph.swap": "from safetensors.torch import load_file\n",
        "road_export.core.names": "from road_export import graph\n",  # upward, through a folder
    }
    found = violations(planted)
    assert len(found) == len(planted), found
    assert violations({"road_export.core.rotation": "def f():\n    import torch\n",
                       "road_export.passes.attach": "from road_export.passes import common\n"
                                                    "from road_export.graph import ops\n",
                       "road_export.export.exporter": "from road_export.graph import swap\n",
                       "road_export.__main__": "from road_export.app.cli import main\n"}) == []


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
