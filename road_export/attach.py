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

from road_export import __version__, rotation
from road_export import ops as road_op
from road_export.adapter_files import AdapterFile, read_adapter
from road_export.errors import RoadError
from road_export.files import load_for_rewrite, save_model
from road_export.names import METADATA_ADAPTERS, METADATA_MODE, METADATA_VERSION
from road_export.passes import common
from road_export.passes.fold import FoldPass

_NODE_NAME = re.compile(r"^/(?P<path>.+)/(?:MatMul|Gemm)(?:_\d+)?(?:_Q\d+)?$")
LINEAR_OPS = ("MatMul", "Gemm", "MatMulNBits")  # MatMulNBits: a layer quantized by road_export.quantize
# quantized layouts a rotation cannot be placed after: their output is not the layer's float output, or the
# weight layout is not one attach reads (quantize with road-export --quantize, which writes MatMulNBits)
UNPLACEABLE_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm")


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


def attach(base: str | Path, adapters: Sequence[str | Path], out: str | Path, mode: str = "rotate",
           quantize: str | None = None) -> AttachReport:
    """`road-export attach`: load BASE.onnx (external data lazy), attach, and save atomically.

    Weights stream: those attach does not change are copied from BASE's `.data` by the kernel, folded ones are
    computed one at a time while they are written. A base quantized by `road-export --quantize` (MatMulNBits)
    takes rotate mode. `quantize` ("int4"/"int8") quantizes a float base's MatMul weights after attaching
    (road_export.quantize; RoadError on a base that is quantized already).

    Raises RoadError for a base that already records adapters (`check_no_adapter`), OUT the same file as BASE, or
    adapters that do not fit."""
    if len(adapters) != 1:
        raise RoadError("attach takes one --adapter; several adapters in one graph need a torch export "
                        "(road-export --adapter a=... --adapter b=... --mode rotate)")
    if Path(out).resolve() == Path(base).resolve() or (Path(out).exists() and Path(out).samefile(base)):
        raise RoadError(f"{out}: is the base model itself; the base is left unchanged, choose another output path")
    files = [read_adapter(a) for a in adapters]
    if quantize is not None:
        from road_export import quantize as quant

        quant.check_scheme(quantize)
    model, external = load_for_rewrite(base, out)
    if quantize is not None and quant.quantization(model) is not None:
        raise RoadError(f"{base}: is quantized already ({quant.quantization(model)}); --quantize takes a float base")
    check_no_adapter(dict(model.metadata_props), base)
    report = attach_to_model(model, files[0], mode, where=str(base))
    model.metadata_props[METADATA_VERSION] = __version__
    model.metadata_props[METADATA_MODE] = mode
    model.metadata_props[METADATA_ADAPTERS] = json.dumps([{
        "name": "default", "variant": files[0].config.variant, "group_size": files[0].config.group_size,
        "layers": sorted(report.placed)}])
    if quantize is not None:
        model, _ = quant.quantize_model(model, quantize, where=str(base))
    # weights stream from the base's `.data` into the new one, tensor by tensor (files.save_model); the new files
    # are written in a staging directory and moved into place after, so BASE may also be OUT
    save_model(model, Path(out), external)
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

    from road_export.files import atomic_write, load_model
    from road_export.names import SEQ2SEQ_FILES

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
