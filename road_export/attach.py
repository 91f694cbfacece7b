"""Attach a peft RoAd adapter to an existing ONNX model, without torch: no re-export, no tracing.

Each adapted module is placed on its MatMul/Gemm through what exporters leave behind:
  - torch.onnx.export(dynamo=True): the node's `pkg.torch.onnx.name_scopes` metadata ends with the module path;
  - torch.onnx.export(dynamo=False) / optimum: node names such as `/model/layers.0/self_attn/q_proj/MatMul`;
  - a weight initializer named `<module path>.weight`.
A path matches when it equals the module path or ends with `.<module path>` (exporters add wrapper prefixes).
Then one `road.Rotate` node goes after the layer's output (after its bias Add), and in merge mode the fold pass
turns it into rotated weights. Any module that cannot be placed exactly once is listed and nothing is written.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from road_export import __version__, rotation
from road_export import ops as road_op
from road_export.adapter_files import AdapterFile, read_adapter
from road_export.errors import RoadError
from road_export.files import load_for_rewrite, save_model
from road_export.names import METADATA_ADAPTERS, METADATA_MODE, METADATA_VERSION
from road_export.passes import common
from road_export.passes.fold import FoldPass

_NODE_NAME = re.compile(r"^/(?P<path>.+)/(?:MatMul|Gemm)(?:_\d+)?$")


@dataclass
class AttachReport:
    """What `attach` did: the MatMul/Gemm node each adapted module went to, road nodes inserted, rotations folded."""

    placed: dict[str, str] = field(default_factory=dict)  # module path -> node name
    road_nodes: int = 0
    folded: int = 0


def _node_paths(node: ir.Node) -> list[str]:
    """Module paths an exporter recorded for a MatMul/Gemm node."""
    paths = []
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes:
        try:
            entries = [e for e in ast.literal_eval(scopes) if e]
        except (ValueError, SyntaxError):
            entries = []
        modules = [e for i, e in enumerate(entries) if i + 1 < len(entries) and entries[i + 1].startswith(e + ".")]
        modules += [e for i, e in enumerate(entries) if i + 1 < len(entries) and not entries[i + 1].startswith(e + ".")
                    and "." not in entries[i + 1]]
        paths += modules[-1:] if modules else []
    match = _NODE_NAME.match(node.name or "")
    if match:
        paths.append(match.group("path").replace("/", "."))
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is not None and weight.name and weight.name.endswith(".weight"):
        paths.append(weight.name[: -len(".weight")])
    return paths


def _matches(candidate: str, module: str) -> bool:
    return candidate == module or candidate.endswith("." + module)


def _linear_output(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The layer's output (after a constant bias Add when there is one) and its width; None if not a linear."""
    weight = common.constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        width = weight.shape[0] if node.attributes.get_int("transB", 0) else weight.shape[1]
        return node.outputs[0], width
    width = weight.shape[1]
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and users[0].node.op_type == "Add" and not out.is_graph_output():
        add = users[0].node
        other = add.inputs[1 - users[0].idx]
        bias = common.constant(other)
        if bias is not None and bias.size == width:
            return add.outputs[0], width
    return out, width


def place(model: ir.Model, adapter: AdapterFile) -> dict[str, ir.Node]:
    """Module path -> its MatMul/Gemm node; raises listing every module that cannot be placed exactly once."""
    candidates = [(n, _node_paths(n)) for n in model.graph.all_nodes() if n.op_type in ("MatMul", "Gemm")]
    placed: dict[str, ir.Node] = {}
    problems: list[str] = []
    for module in adapter.road:
        found = {id(n): n for n, paths in candidates if any(_matches(p, module) for p in paths)}
        if len(found) == 1:
            placed[module] = next(iter(found.values()))
        else:
            problems.append(f"{module} ({'no MatMul/Gemm found' if not found else f'{len(found)} candidates'})")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise RoadError(f"{adapter.path}: cannot place {len(problems)} of {len(adapter.road)} adapted module(s) in "
                        f"the ONNX graph: {shown}. Nothing was written.")
    return placed


def attach_to_model(model: ir.Model, adapter: AdapterFile, mode: str = "rotate",
                    name: str = "default") -> AttachReport:
    """Insert the adapter's rotations into `model` (in place); merge mode folds them into the weights."""
    if mode not in ("merge", "rotate"):
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    if adapter.extra:
        raise RoadError(f"{adapter.path}: carries modules_to_save tensors ({next(iter(adapter.extra))}); attach "
                        "places rotations only: export from torch with road-export --base/--adapter instead")
    config = adapter.config
    report = AttachReport()
    plans = []
    for module, node in place(model, adapter).items():
        found = _linear_output(node)
        if found is None:
            raise RoadError(f"{adapter.path}: {module} maps to {node.op_type} {node.name!r}, whose weight is not a "
                            "constant 2-D tensor")
        out, width = found
        theta = adapter.road[module]["road_theta"].astype(np.float32)
        alpha = adapter.road[module]["road_alpha"].astype(np.float32)
        if width % config.group_size or theta.shape != (rotation.params_length(config.variant, width),):
            raise RoadError(f"{adapter.path}: {module} has {width} outputs in the graph; its {config.variant} "
                            f"tensors of {theta.size} with group size {config.group_size} do not fit")
        plans.append((module, node, out, *rotation.coefficients(config.variant, config.group_size, theta, alpha)))
    for module, node, out, c1, c2 in plans:
        dtype = common.constant(node.inputs[1]).dtype  # the layer's own precision
        _insert_rotation(model, out, c1.astype(dtype), c2.astype(dtype), config.group_size, module, name)
        report.placed[module] = node.name or node.op_type
    road_op.attach_functions(model)
    report.road_nodes = len(plans)
    if mode == "merge":
        folded = FoldPass()(model).folded
        report.folded = folded
        if folded != len(plans):
            raise RoadError(f"{adapter.path}: only {folded} of {len(plans)} rotations could be folded into "
                            "weights; use --mode rotate")
    return report


def _insert_rotation(model: ir.Model, out: ir.Value, c1: np.ndarray, c2: np.ndarray, g: int, module: str,
                     name: str) -> None:
    graph = model.graph
    v1 = ir.Value(name=common.unique_name(graph, f"{module}.road_c1_{name}"), const_value=ir.tensor(c1))
    graph.register_initializer(v1)
    v2 = ir.Value(name=common.unique_name(graph, f"{module}.road_c2_{name}"), const_value=ir.tensor(c2))
    graph.register_initializer(v2)
    uses = list(out.uses())
    node = ir.node(road_op.OP_TYPE, [out, v1, v2], attributes={"group_size": g}, domain=road_op.DOMAIN,
                   name=f"{module}.road")
    if out.dtype is not None:  # graphs from the legacy exporter carry no types for intermediate values
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(out.producer(), node)
    for use in uses:
        use.node.replace_input_with(use.idx, node.outputs[0])
    if out.is_graph_output():
        index = [i for i, v in enumerate(graph.outputs) if v is out]
        old_name = out.name
        out.name = f"{old_name}_before_road"
        node.outputs[0].name = old_name
        for i in index:
            graph.outputs[i] = node.outputs[0]
    else:
        node.outputs[0].name = f"{module}.road_out"


def check_no_adapter(metadata: dict[str, str], path: str | Path) -> None:
    """Refuse a base whose metadata (`road_export.adapters`) records adapters already merged or attached: attaching
    again would rotate the rotated layers a second time. Raises RoadError (one line)."""
    try:
        recorded = json.loads(metadata.get(METADATA_ADAPTERS) or "[]")
    except ValueError:
        recorded = []
    names = [str(a.get("name", "?")) for a in recorded if isinstance(a, dict)] if isinstance(recorded, list) else []
    if names:
        mode = metadata.get(METADATA_MODE, "?")
        raise RoadError(f"{path}: already holds adapter(s) {', '.join(names)} ({mode}, recorded in its "
                        f"{METADATA_ADAPTERS} metadata); attaching would apply a rotation twice; attach to the base "
                        "model's ONNX file instead")


def attach(base: str | Path, adapters: Sequence[str | Path], out: str | Path, mode: str = "rotate") -> AttachReport:
    """`road-export attach`: load BASE.onnx (external data too), attach, and save atomically.

    Raises RoadError for a base that already records adapters (`check_no_adapter`), OUT the same file as BASE, or
    adapters that do not fit."""
    if len(adapters) != 1:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate)")
    if Path(out).resolve() == Path(base).resolve() or (Path(out).exists() and Path(out).samefile(base)):
        raise RoadError(f"{out}: is the base model itself; the base is left unchanged, choose another output path")
    files = [read_adapter(a) for a in adapters]
    model, external = load_for_rewrite(base, out)
    check_no_adapter(dict(model.metadata_props), base)
    report = attach_to_model(model, files[0], mode)
    model.metadata_props[METADATA_VERSION] = __version__
    model.metadata_props[METADATA_MODE] = mode
    model.metadata_props[METADATA_ADAPTERS] = json.dumps([{
        "name": "default", "variant": files[0].config.variant, "group_size": files[0].config.group_size,
        "layers": sorted(report.placed)}])
    for value in model.graph.initializers.values():  # materialise before the source files are replaced
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
    save_model(model, Path(out), external)
    return report
