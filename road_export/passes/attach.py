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
import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from road_export.core.version import __version__
from road_export.core import rotation
from road_export.graph import ops as road_op
from road_export.graph.adapter_files import AdapterFile, read_adapter
from road_export.core.errors import RoadError
from road_export.graph.files import load_for_rewrite, save_model
from road_export.core.names import (GRAPH_BUILDER, METADATA_ADAPTERS, METADATA_GRAPH, METADATA_MODE, METADATA_VERSION,
                                    recorded_adapter_names)
from road_export.passes import common
from road_export.passes.fold import FoldPass

_NODE_NAME = re.compile(r"^/(?P<path>.+)/(?:MatMul|Gemm)(?:_\d+)?(?:_Q\d+)?$")
LINEAR_OPS = ("MatMul", "Gemm", "MatMulNBits")  # MatMulNBits: a layer quantized by road_export.graph.quantize
# quantized layouts a rotation cannot be placed after: their output is not the layer's float output, or the
# weight layout is not one attach reads (quantize with road-export --quantize, which writes MatMulNBits)
UNPLACEABLE_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm")


@dataclass
class AttachReport:
    """What `attach` did: the MatMul/Gemm node each adapted module went to, road nodes inserted, rotations folded."""

    placed: dict[str, str] = field(default_factory=dict)  # module path -> node name
    road_nodes: int = 0
    folded: int = 0
    builder: bool = False  # placed on an onnxruntime-genai model builder graph (road_export.passes.builder_graph)
    # swappable builder attach: {adapter name: {initializer name: values}} for its `.onnx_adapter` file
    swap_values: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


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
    name = weight.name.removesuffix(f"_Q{node.attributes.get_int('bits', 4)}") if weight is not None and \
        weight.name and node.op_type == "MatMulNBits" else (weight.name if weight is not None else None)
    if name and name.endswith(".weight"):
        paths.append(name[: -len(".weight")])
    return paths


def _matches(candidate: str, module: str) -> bool:
    return candidate == module or candidate.endswith("." + module)


def _linear_output(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The layer's output (after a constant bias Add when there is one) and its width; None if not a linear."""
    if node.op_type == "MatMulNBits":
        width = node.attributes.get_int("N", 0)
        if not width or len(node.inputs) > 5 and node.inputs[5] is not None:  # a bias input: not written by us
            return None
    else:
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
    candidates = [(n, _node_paths(n)) for n in model.graph.all_nodes()
                  if n.op_type in LINEAR_OPS or n.op_type in UNPLACEABLE_OPS]
    placed: dict[str, ir.Node] = {}
    problems: list[str] = []
    for module in adapter.road:
        found = {id(n): n for n, paths in candidates if any(_matches(p, module) for p in paths)}
        if len(found) == 1:
            placed[module] = next(iter(found.values()))
        else:
            problems.append(f"{module} ({'no MatMul/Gemm found' if not found else f'{len(found)} candidates'})")
    unplaceable = {m: n for m, n in placed.items() if n.op_type in UNPLACEABLE_OPS}
    if unplaceable or problems:
        _refuse_quantized(model, adapter, len(unplaceable) + len(problems), unplaceable)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise RoadError(f"{adapter.path}: cannot place {len(problems)} of {len(adapter.road)} adapted module(s) in "
                        f"the ONNX graph: {shown}. Nothing was written.")
    return placed


def _refuse_quantized(model: ir.Model, adapter: AdapterFile, stuck: int, unplaceable: dict[str, ir.Node]) -> None:
    """RoadError when the modules that could not be placed (`stuck`) sit in a base whose MatMuls another tool
    quantized: ops attach cannot place after (MatMulInteger, QLinearMatMul, ...), QDQ (DequantizeLinear weights)
    or MatMulNBits without the module paths that road-export --quantize keeps. Nothing when the base is float."""
    from collections import Counter

    nodes = list(model.graph.all_nodes())
    ops = Counter(n.op_type for n in nodes if n.op_type in UNPLACEABLE_OPS)
    qdq = sum(1 for n in nodes if n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1 and n.inputs[1] is not None
              and n.inputs[1].producer() is not None and n.inputs[1].producer().op_type == "DequantizeLinear")
    nbits = sum(1 for n in nodes if n.op_type == "MatMulNBits")
    total = len(adapter.road)
    todo = ("attach to the float base, adding --quantize int4|int8 for a quantized result (MatMulNBits that attach "
            "reads), or export from torch with road-export --quantize. Nothing was written.")
    if unplaceable or ops:
        op = next(iter(unplaceable.values())).op_type if unplaceable else ops.most_common(1)[0][0]
        raise RoadError(f"{adapter.path}: the base is quantized as {op} ({ops[op]} node(s)), and {stuck} of {total} "
                        f"adapted module(s) sit on such MatMuls; attach places rotations after float MatMul/Gemm or "
                        f"MatMulNBits only: {todo}")
    if qdq or nbits:
        what = f"{qdq} MatMul weight(s) from DequantizeLinear (QDQ)" if qdq >= nbits else f"{nbits} MatMulNBits"
        raise RoadError(f"{adapter.path}: cannot place {stuck} of {total} adapted module(s): the base's MatMuls are "
                        f"quantized ({what}) by another tool, whose nodes attach cannot map to the adapter's modules "
                        f"(road-export --quantize keeps their module paths); {todo}")


def _refuse_merge_into_quantized(model: ir.Model, where: str | None, quantized: int, placed: int) -> None:
    """RoadError for --mode merge onto a base whose MatMul weights are MatMulNBits (`quantized` of the adapter's
    `placed` modules sit on them): the message names the base and counts its MatMulNBits by bits."""
    from collections import Counter

    bits = Counter(n.attributes.get_int("bits", 4) for n in model.graph.all_nodes() if n.op_type == "MatMulNBits")
    counts = ", ".join(f"{count} int{b}" for b, count in sorted(bits.items()))
    modules = "" if quantized == placed else f" ({quantized} of the adapter's {placed} modules sit on them)"
    raise RoadError(f"{where or 'the base'}: its MatMul weights are quantized (MatMulNBits: {counts}){modules}, and "
                    "a rotation cannot be folded into quantized weights; use --mode rotate (road nodes after the "
                    "quantized layers), or attach --mode merge to the float base and --quantize the result")


def attach_to_model(model: ir.Model, adapter: AdapterFile, mode: str = "rotate",
                    name: str = "default", where: str | None = None) -> AttachReport:
    """Insert the adapter's rotations into `model` (in place); merge mode folds them into the weights. `where`
    names the model in messages about it (the BASE.onnx path; "the base" without)."""
    if mode not in ("merge", "rotate"):
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    base_weights = [k for k in adapter.extra if ".base_layer." in k]
    if base_weights:  # peft saves an adapted layer's base weight when it is tied to the input embeddings
        module = base_weights[0].split(".base_layer.")[0]
        raise RoadError(f"{adapter.path}: carries the base weight of {module} ({base_weights[0]}), which peft saves "
                        "for an adapted layer tied to the input embeddings (tie_word_embeddings); attach places "
                        "rotations only and cannot untie it: export from torch with road-export --base/--adapter "
                        "instead")
    if adapter.extra:
        raise RoadError(f"{adapter.path}: carries modules_to_save tensors ({next(iter(adapter.extra))}); attach "
                        "places rotations only: export from torch with road-export --base/--adapter instead")
    config = adapter.config
    report = AttachReport()
    plans = []
    placed = place(model, adapter)
    quantized = [m for m, n in placed.items() if n.op_type == "MatMulNBits"]
    if quantized and mode == "merge":
        _refuse_merge_into_quantized(model, where, len(quantized), len(placed))
    for module, node in placed.items():
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
        scale = node.inputs[2] if node.op_type == "MatMulNBits" else node.inputs[1]  # float scales of MatMulNBits
        dtype = common.constant(scale).dtype  # the layer's own precision
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
                     name: str) -> ir.Node:
    graph = model.graph
    v1 = ir.Value(name=common.unique_name(graph, f"{module}.road_c1_{name}"), const_value=ir.tensor(c1))
    graph.register_initializer(v1)
    v2 = ir.Value(name=common.unique_name(graph, f"{module}.road_c2_{name}"), const_value=ir.tensor(c2))
    graph.register_initializer(v2)
    return _insert_rotation_node(model, out, v1, v2, g, module)


def _insert_rotation_node(model: ir.Model, out: ir.Value, v1: ir.Value, v2: ir.Value, g: int, module: str,
                          after: ir.Node | None = None) -> ir.Node:
    """road.Rotate(out, v1, v2) inserted after `after` (default: out's producer), every use of `out` moved to it."""
    graph = model.graph
    uses = [u for u in out.uses() if u.node is not None]
    node = ir.node(road_op.OP_TYPE, [out, v1, v2], attributes={"group_size": g}, domain=road_op.DOMAIN,
                   name=f"{module}.road")
    if out.dtype is not None:  # graphs from the legacy exporter carry no types for intermediate values
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
    graph.insert_after(after if after is not None else out.producer(), node)
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
    return node


def attach_builder(model: ir.Model, adapters: dict[str, AdapterFile], mode: str = "rotate", *,
                   swappable: bool = True, where: str | None = None) -> AttachReport:
    """Insert RoAd into a graph written by onnxruntime-genai's model builder (in place), placed by
    road_export.passes.builder_graph: one `road.Rotate` per adapted projection, after its MatMul / MatMulNBits and after
    its bias Add, whose c1/c2 hold the packed parts' coefficients side by side (identity on parts not adapted).

    One adapter, rotate mode: coefficients `<builder path>.road_c1_<name>` / `.road_c2_<name>` [width] in the
    layer's dtype; with `swappable` they become graph inputs with initializer defaults and the `road_export.swap`
    records (road_export.graph.swap.make_swappable) gain "parts": [[peft module, offset, width], ...] for every part of
    the projection, so another adapter converts to an `.onnx_adapter` for it; `report.swap_values` holds the
    attached adapter's own file. Several adapters (rotate): the mixed-batch form of road-export's exports, an int64
    input `adapter_ids` [batch_size] and per group size g banks `<builder path>.road_bank_c1_g<g>` [adapters + 1,
    width] (row 0 identity, row k the k-th adapter) read by Unsqueeze(adapter_ids, [1]) -> GatherND ->
    Reshape([-1, 1, width]) (what passes/matmul_rotate.py fuses into road.MatMulRotateRows). Merge mode folds one
    adapter into float MatMul weights. Raises RoadError (one line, model unchanged) for modules that cannot be
    placed, a group straddling two packed parts, merge into MatMulNBits, or several adapters with merge."""
    from road_export.passes import builder_graph
    from road_export.graph import swap
    from road_export.core.names import ADAPTER_IDS, BATCH

    if mode not in ("merge", "rotate"):
        raise RoadError(f"unknown mode {mode!r}; choose merge or rotate")
    for adapter in adapters.values():
        if adapter.extra:
            raise RoadError(f"{adapter.path}: carries modules_to_save or base weights ({next(iter(adapter.extra))});"
                            " attach places rotations only: export from torch with road-export --base/--adapter")
    if mode == "merge" and len(adapters) > 1:
        raise RoadError(f"{len(adapters)} adapters cannot be merged into one set of weights; use --mode rotate for "
                        f"one graph that serves them all (input {ADAPTER_IDS})")
    placements = builder_graph.plan(model, adapters, where or "the base")
    if mode == "merge":
        quantized = [p for p in placements if p.linear.node.op_type == "MatMulNBits"]
        if quantized:
            _refuse_merge_into_quantized(model, where, len(quantized), len(placements))
    report = AttachReport(builder=True)
    graph = model.graph
    names = list(adapters)
    coefficients = {id(p): {n: p.coefficients(adapters[n], n) for n in names} for p in placements}
    ids_index = None
    if len(names) > 1:
        ids = ir.Value(name=ADAPTER_IDS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([BATCH]))
        graph.inputs.append(ids)
        axes = _constant(graph, "road_adapter_ids_axes", np.array([1], np.int64))
        unsqueeze = ir.node("Unsqueeze", [ids, axes], name="road_adapter_ids/Unsqueeze")
        graph.insert_before(graph.node(0), unsqueeze)
        ids_index = unsqueeze.outputs[0]
        ids_index.name = "road_adapter_ids/Unsqueeze/output_0"
    layer_of: dict[str, str] = {}
    for placement in placements:
        linear = placement.linear
        scale = linear.node.inputs[2] if linear.node.op_type == "MatMulNBits" else linear.node.inputs[1]
        dtype = common.constant(scale).dtype
        if linear.output.shape is None:  # the builder's hidden states: [batch_size, sequence_length, width]
            linear.output.shape = ir.Shape([BATCH, "sequence_length", linear.width])
        if linear.output.dtype is None:
            linear.output.dtype = ir.DataType.from_numpy(np.dtype(dtype))
        if ids_index is None:
            name = names[0]
            c1, c2 = coefficients[id(placement)][name]
            g = adapters[name].config.group_size
            node = _insert_rotation(model, linear.output, c1.astype(dtype), c2.astype(dtype), g, linear.path, name)
            layer_of[node.inputs[1].name] = linear.path
            report.road_nodes += 1
        else:
            out = linear.output
            sizes = sorted({adapters[n].config.group_size for n in placement.modules})
            for g in sizes:
                rows1 = [np.ones(linear.width, np.float32)]
                rows2 = [np.zeros(linear.width, np.float32)]
                for n in names:
                    c1, c2 = coefficients[id(placement)][n]
                    same = n in placement.modules and adapters[n].config.group_size == g
                    rows1.append(c1 if same else np.ones(linear.width, np.float32))
                    rows2.append(c2 if same else np.zeros(linear.width, np.float32))
                banks = [_constant(graph, f"{linear.path}.road_bank_c{k}_g{g}", np.stack(r).astype(dtype))
                         for k, r in ((1, rows1), (2, rows2))]
                shape = _constant(graph, f"{linear.path}.road_rows_shape", np.array([-1, 1, linear.width], np.int64))
                rows = []
                for k, bank in zip((1, 2), banks, strict=True):
                    gather = ir.node("GatherND", [bank, ids_index], name=f"{linear.path}.road_c{k}_g{g}/GatherND")
                    reshape = ir.node("Reshape", [gather.outputs[0], shape],
                                      name=f"{linear.path}.road_c{k}_g{g}/Reshape")
                    graph.insert_after(out.producer(), [gather, reshape])
                    rows.append(reshape.outputs[0])
                node = _insert_rotation_node(model, out, rows[0], rows[1], g,
                                             linear.path + (f"_g{g}" if len(sizes) > 1 else ""),
                                             after=rows[1].producer())
                out = node.outputs[0]
                report.road_nodes += 1
        for modules in placement.modules.values():
            for module, _, _, _ in modules:
                report.placed[module] = linear.node.name or linear.node.op_type
    road_op.attach_functions(model)
    if mode == "merge":
        report.folded = FoldPass()(model).folded
        if report.folded != len(placements):
            raise RoadError(f"{adapters[names[0]].path}: only {report.folded} of {len(placements)} rotations could be "
                            "folded into weights; use --mode rotate")
        return report
    if ids_index is None and swappable:
        records = swap.make_swappable(model, layer_of)
        by_path = {p.linear.path: p for p in placements}
        values: dict[str, np.ndarray] = {}
        for layer, record in records.items():
            record["parts"] = _part_modules(by_path[layer])  # [[peft module, offset, width, source offset]]
            c1, c2 = coefficients[id(by_path[layer])][names[0]]
            values[record["c1"]], values[record["c2"]] = c1.astype(record["dtype"]), c2.astype(record["dtype"])
        report.swap_values[names[0]] = values
        model.metadata_props[swap.METADATA_KEY] = json.dumps(records, sort_keys=True)
    return report


def _part_modules(placement) -> list[list]:
    """[[peft module, offset, width], ...] for every part of a placement's projection: the adapted parts' own
    module paths, the others named like them (`...self_attn.q_proj` adapted -> `...self_attn.k_proj` beside it);
    one entry when a module covers the whole projection (a transformers model with its own packed `qkv_proj`)."""
    modules = [m for ms in placement.modules.values() for m in ms]
    width = placement.linear.width
    whole = [(m, source) for m, offset, w, source in modules if offset == 0 and w == width]
    if whole:
        return [[whole[0][0], 0, width, whole[0][1]]]
    known = {(offset, w): (m, source) for m, offset, w, source in modules}
    template = modules[0][0]
    stem = template.rsplit(".", 1)[0]
    out, offset = [], 0
    for part, w in placement.linear.parts:
        module, source = known.get((offset, w), (f"{stem}.{part}", 0))
        out.append([module, offset, w, source])
        offset += w
    return out


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer (its name made unique) holding `array`, typed and shaped."""
    value = ir.Value(name=common.unique_name(graph, name), const_value=ir.tensor(array),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
    graph.register_initializer(value)
    return value


def adapter_specs(texts: Sequence[str]) -> list[tuple[str, Path]]:
    """`[NAME=]DIR` texts -> [(name, path)]: without NAME the first is "default" and later ones take their folder's
    name (the rule of road_export.export.source.parse_adapter, torch-free). Raises RoadError for a bad or repeated
    name."""
    from road_export.core.names import check_adapter_name

    specs = []
    for i, text in enumerate(texts):
        name, sep, path = text.partition("=")
        if not sep or Path(text).exists():
            name, path = ("default" if i == 0 else Path(text).name), text
        if not path or not name:
            raise RoadError(f"--adapter {text!r}: expected [NAME=]DIR")
        check_adapter_name(name, f"--adapter {text}: adapter name")
        specs.append((name, Path(path)))
    if len({n for n, _ in specs}) != len(specs):
        raise RoadError(f"--adapter: names {', '.join(n for n, _ in specs)} repeat; give each NAME=DIR its own")
    return specs


def record_attached(model: ir.Model, adapters: list[tuple[str, AdapterFile]], mode: str, placed) -> None:
    """The metadata of a graph RoAd was attached to: road-export's version, `mode`, and one `road_export.adapters`
    record per (name, adapter file) {name, variant, group_size, layers placed[, id when several]}."""
    model.metadata_props[METADATA_VERSION] = __version__
    model.metadata_props[METADATA_MODE] = mode
    records = []
    for i, (name, file) in enumerate(adapters):
        record = {"name": name, "variant": file.config.variant, "group_size": file.config.group_size,
                  "layers": sorted(m for m in file.road if m in placed)}
        if len(adapters) > 1:
            record["id"] = i + 1
        records.append(record)
    model.metadata_props[METADATA_ADAPTERS] = json.dumps(records)


def check_no_adapter(metadata: dict[str, str], path: str | Path) -> None:
    """Refuse a base whose metadata (`road_export.adapters`) records adapters already merged or attached: attaching
    again would rotate the rotated layers a second time. Raises RoadError (one line), also for a damaged record
    (`names.read_record`: it cannot tell whether the file holds adapters)."""
    names = recorded_adapter_names(metadata, str(path))
    if names:
        mode = metadata.get(METADATA_MODE, "?")
        raise RoadError(f"{path}: already holds adapter(s) {', '.join(names)} ({mode}, recorded in its "
                        f"{METADATA_ADAPTERS} metadata); attaching would apply a rotation twice; attach to the base "
                        "model's ONNX file instead")


def attach(base: str | Path, adapters: Sequence[str | Path], out: str | Path, mode: str = "rotate",
           quantize: str | None = None, *, names: Sequence[str] | None = None,
           swappable: bool | None = None) -> AttachReport:
    """`road-export attach`: load BASE.onnx (external data lazy), attach, and save atomically.

    Weights stream: those attach does not change are copied from BASE's `.data` by the kernel, folded ones are
    computed one at a time while they are written. A base quantized by `road-export --quantize` (MatMulNBits)
    takes rotate mode. `quantize` ("int4"/"int8") quantizes a float base's MatMul weights after attaching
    (road_export.graph.quantize; RoadError on a base that is quantized already).

    A graph written by onnxruntime-genai's model builder is placed by `attach_builder`: `names` name the adapters
    (default "default", then the folders' names), several adapters give the mixed-batch form (`adapter_ids`), and
    one adapter in rotate mode is swappable unless `swappable=False` (then `OUT_STEM.<name>.onnx_adapter` is
    written beside OUT). Other graphs take one adapter with constant coefficients, as before.

    Raises RoadError for a base that already records adapters (`check_no_adapter`), OUT the same file as BASE, or
    adapters that do not fit."""
    from road_export.passes import builder_graph

    if Path(out).resolve() == Path(base).resolve() or (Path(out).exists() and Path(out).samefile(base)):
        raise RoadError(f"{out}: is the base model itself; the base is left unchanged, choose another output path")
    files = [read_adapter(a) for a in adapters]
    names = list(names) if names is not None else ["default" if i == 0 else Path(a).name
                                                   for i, a in enumerate(adapters)]
    if len(set(names)) != len(names):
        raise RoadError(f"adapter names {', '.join(names)}: each adapter needs its own name (--adapter NAME=DIR)")
    if quantize is not None:
        from road_export.graph import quantize as quant

        quant.check_scheme(quantize)
    model, external = load_for_rewrite(base, out)
    builder = builder_graph.is_builder_graph(model)
    if len(files) != 1 and not builder:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate), or a model builder graph")
    if quantize is not None and quant.quantization(model) is not None:
        raise RoadError(f"{base}: is quantized already ({quant.quantization(model)}); --quantize takes a float base")
    check_no_adapter(dict(model.metadata_props), base)
    if builder:
        report = attach_builder(model, dict(zip(names, files, strict=True)), mode,
                                swappable=swappable is not False, where=str(base))
        model.metadata_props[METADATA_GRAPH] = GRAPH_BUILDER
    else:
        if swappable:
            raise RoadError(f"{base}: swappable attach needs a model builder graph; export from torch with --mode "
                            "rotate for a swappable model")
        report = attach_to_model(model, files[0], mode, where=str(base))
    record_attached(model, list(zip(names, files, strict=True)), mode, report.placed)
    if quantize is not None:
        model, _ = quant.quantize_model(model, quantize, where=str(base))
    # weights stream from the base's `.data` into the new one, tensor by tensor (files.save_model); the new files
    # are written in a staging directory and moved into place after, so BASE may also be OUT
    save_model(model, Path(out), external)
    if report.swap_values:
        from road_export.graph import swap

        for name, values in report.swap_values.items():
            swap.write_adapter_file(swap.adapter_file_path(Path(out), name), values)
    return report


def attach_seq2seq(base: str | Path, adapter: str | Path, out: str | Path, mode: str = "rotate") -> AttachReport:
    """`road-export attach` for an encoder-decoder export: BASE is a directory with optimum's files
    (`encoder_model.onnx`, `decoder_model.onnx`, `decoder_with_past_model.onnx`, in it or in its `onnx/` folder);
    OUT is written as a new directory of the same layout, atomically, every other file copied.

    Each file gets the adapter's modules whose MatMul it holds (a T5 decoder's cross-attention k/v only in
    decoder_model.onnx: decoder_with_past_model.onnx takes them from the cache); a module placed in no file, or twice
    in one, is refused and nothing is written. Returns the report summed over the files (`placed` keys are
    `<file>:<module>`). Raises RoadError for a BASE without the files or an OUT that exists.
    """
    import shutil

    from road_export.graph.files import atomic_write, load_model
    from road_export.core.names import SEQ2SEQ_FILES

    base, out = Path(base), Path(out)
    folder = next((f for f in (base / "onnx", base) if (f / SEQ2SEQ_FILES[0]).is_file()
                   and (f / SEQ2SEQ_FILES[1]).is_file()), None)
    if folder is None:
        raise RoadError(f"{base}: no {SEQ2SEQ_FILES[0]} and {SEQ2SEQ_FILES[1]} in it or in its onnx/ folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RoadError(f"{out}: exists and is not empty; give a new directory for the attached model")
    file = read_adapter(adapter)
    models = {name: load_model(folder / name) for name in SEQ2SEQ_FILES if (folder / name).is_file()}
    placed_anywhere: set[str] = set()
    subsets = {}
    for name, model in models.items():
        candidates = [(n, _node_paths(n)) for n in model.graph.all_nodes() if n.op_type in ("MatMul", "Gemm")]
        here = {m for m in file.road if any(_matches(p, m) for _, paths in candidates for p in paths)}
        subsets[name] = dataclasses.replace(file, road={m: v for m, v in file.road.items() if m in here})
        placed_anywhere |= here
    missing = sorted(set(file.road) - placed_anywhere)
    if missing:
        raise RoadError(f"{file.path}: cannot place {len(missing)} of {len(file.road)} adapted module(s) in any file "
                        f"of {base}: {', '.join(missing[:6])}. Nothing was written.")
    total = AttachReport()
    with atomic_write(out) as staged:
        target = staged / folder.relative_to(base) if folder != base else staged
        if folder != base:
            shutil.copytree(base, staged, ignore=shutil.ignore_patterns("*.onnx", "*.onnx.data", "*.onnx_adapter"))
        target.mkdir(parents=True, exist_ok=True)
        for name, model in models.items():
            subset = subsets[name]
            if subset.road:
                report = attach_to_model(model, subset, mode, where=str(folder / name))
                total.placed.update({f"{name}:{m}": n for m, n in report.placed.items()})
                total.road_nodes += report.road_nodes
                total.folded += report.folded
            model.metadata_props[METADATA_VERSION] = __version__
            model.metadata_props[METADATA_MODE] = mode
            layers = sorted(subset.road) if mode == "rotate" else sorted(file.road)
            model.metadata_props[METADATA_ADAPTERS] = json.dumps([{
                "name": "default", "variant": file.config.variant, "group_size": file.config.group_size,
                "layers": layers}] if layers else [])
            for value in model.graph.initializers.values():
                if isinstance(value.const_value, ir.ExternalTensor):
                    value.const_value = ir.tensor(value.const_value.numpy(), name=value.name)
            save_model(model, target / name, None)
        if folder == base:  # a flat directory: its other files beside the models
            for extra in base.iterdir():
                if extra.is_file() and not extra.name.endswith((".onnx", ".onnx.data", ".onnx_adapter")):
                    shutil.copyfile(extra, staged / extra.name)
    return total
