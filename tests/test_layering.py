"""The package's layering: nothing imports a layer above its own, and export and runtime do not import each other.

    1 maths and config      errors, config, rotation, names, legacy_tokenizers (data)
    2 ONNX ops and I/O      ops, files, checks, adapter_files, swap, inspection, model_dir, quantize, parity
    3 passes                passes.*, attach, builder_graph
    4 export (torch)        layers, model, adapters, zoo, source, checkpoint, export.*
    4 runtime (ORT)         runtime, generation, native, seq2seq, gpu, kvcache, sessions
    5 harness, CLI, server  verify, crossing, crosscheck, testing, cli, serving.*, genai_builder

A module may import its own layer and any layer below; the two halves of layer 4 are siblings. Lazy imports inside
functions count too. Layers 1-3 and the runtime are the serving floor: they must not import torch, transformers or
peft at all, except the two listed places that take a torch tensor or a torch pickle when one is handed to them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "road_export"

LAYERS: dict[str, tuple[int, str]] = {
    **{m: (1, "base") for m in ("errors", "config", "rotation", "names", "requires_export", "legacy_tokenizers")},
    **{m: (2, "onnx") for m in ("ops", "files", "checks", "adapter_files", "swap", "inspection", "model_dir",
                                "quantize", "parity")},
    **{m: (3, "passes") for m in ("passes", "attach", "builder_graph")},
    **{m: (4, "export") for m in ("layers", "model", "adapters", "zoo", "source", "checkpoint", "export")},
    **{m: (4, "runtime") for m in ("runtime", "generation", "native", "seq2seq", "gpu", "kvcache",
                                   "sessions")},
    **{m: (5, "top") for m in ("verify", "crossing", "crosscheck", "testing", "cli", "serving", "genai_builder")},
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


def package_sources() -> dict[str, str]:
    sources = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
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
