"""RoAd placement on graphs written by onnxruntime-genai's model builder; torch-free (onnx-ir + numpy).

The builder (`python -m onnxruntime_genai.models.builder`, builders/base.py) names each projection after its
block, not after the transformers module: `/model/layers.N/attn/qkv_proj/MatMul` (q, k and v packed, the default
`fuse_qkv`), `/model/layers.N/attn/{q,k,v,o}_proj/MatMul`, `/model/layers.N/mlp/{gate,up,down}_proj/MatMul`, a packed
`/model/layers.N/mlp/gate_up_proj/MatMul` where it packs the MLP, `..._Q4` for a MatMulNBits; a bias is an Add
after it (`.../qkv_proj/Add`, Qwen2). peft names the same layers after transformers' modules
(`model.layers.N.self_attn.q_proj`). The mapping here is read from the graph: each builder projection is keyed by
(layer N, block, projection), its packed parts and their widths come from the node that consumes it
(GroupQueryAttention's num_heads / kv_num_heads for `qkv_proj`, a Split's sizes, or equal halves for
`gate_up_proj`), and an adapter module `<...>.layers.N.<block>.<proj>` goes to the projection of the same layer and
block that is `<proj>` or packs a part named `<proj>`.

RoAd is elementwise on output features (in groups of g), so a packed output takes one rotation whose c1/c2 are
the parts' coefficient vectors side by side, identity (c1 = 1, c2 = 0) on a part the adapter does not target.
That is exact when no group of an adapted part reaches into another part; otherwise the placement is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from road_export.core import rotation
from road_export.graph.adapter_files import AdapterFile
from road_export.core.errors import RoadError
from road_export.passes import common

__all__ = ["BuilderLinear", "Placement", "builder_linears", "is_builder_graph", "locate_module", "module_width", "plan"]

# the builder's node names (builders/base.py make_attention / make_mlp_proj / make_matmul)
_NODE = re.compile(r"^/model/layers\.(?P<layer>\d+)/(?P<block>attn|mlp)/(?P<proj>\w+)/MatMul(?:_Q\d+)?$")
# what the builder packs into one projection, in output order
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# transformers' block names for attention and MLP (llama/qwen2/mistral/phi3: self_attn, mlp)
_BLOCKS = {"self_attn": "attn", "attn": "attn", "attention": "attn", "self_attention": "attn",
           "mlp": "mlp", "feed_forward": "mlp"}
_MODULE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(?P<layer>\d+)\.(?P<block>\w+)\.(?P<proj>\w+)$")


@dataclass
class BuilderLinear:
    """One builder projection: its MatMul/MatMulNBits node, its float output (after the bias Add, if any) and
    width, and its parts [(projection name, width)] in output order (one part when it is not packed)."""

    node: ir.Node
    layer: int
    block: str
    proj: str
    output: ir.Value
    width: int
    parts: list[tuple[str, int]]

    @property
    def path(self) -> str:
        """The builder's path of the projection, `model.layers.N.attn.qkv_proj` (its initializers' prefix)."""
        return f"model.layers.{self.layer}.{self.block}.{self.proj}"


@dataclass
class Placement:
    """A builder projection and, per adapter name, the adapter's modules on it: [(module, offset, width, source)]:
    outputs offset:offset+width of the projection are the module's outputs source:source+width (source > 0 only
    for a module the builder split over several projections, e.g. Phi-3's `gate_up_proj` as gate_proj, up_proj)."""

    linear: BuilderLinear
    modules: dict[str, list[tuple[str, int, int, int]]] = field(default_factory=dict)

    def coefficients(self, adapter: AdapterFile, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(c1, c2) float32 [width] of adapter `name` on this projection: its modules' coefficients at their
        offsets (rotation.coefficients, peft's `_prepare_cols`), identity elsewhere. A module the builder split
        over several projections (an entry with a source offset) contributes its slice."""
        width = self.linear.width
        c1, c2 = np.ones(width, np.float32), np.zeros(width, np.float32)
        config = adapter.config
        for module, offset, part, source in self.modules.get(name, []):
            theta = adapter.road[module]["road_theta"].astype(np.float32)
            alpha = adapter.road[module]["road_alpha"].astype(np.float32)
            full = module_width(config.variant, theta.size)
            if full is None or full < source + part or part % config.group_size or source % config.group_size:
                raise RoadError(f"{adapter.path}: {module} has {part} outputs in the graph (part of "
                                f"{self.linear.path}); its {config.variant} tensors of {theta.size} with group size "
                                f"{config.group_size} do not fit")
            p1, p2 = rotation.coefficients(config.variant, config.group_size, theta, alpha)
            c1[offset:offset + part], c2[offset:offset + part] = p1[source:source + part], p2[source:source + part]
        return c1, c2


def module_width(variant: str, params: int) -> int | None:
    """The output width d of a layer whose road_theta has `params` elements (rotation.params_length inverted)."""
    d = {"road_1": 2 * params, "road_2": params, "road_4": params // 2}.get(variant)
    return d if d is not None and rotation.params_length(variant, d) == params else None


def is_builder_graph(model: ir.Model) -> bool:
    """Whether the graph carries the model builder's projection names (`/model/layers.N/attn|mlp/X/MatMul`)."""
    return any(_NODE.match(n.name or "") for n in model.graph.all_nodes()
               if n.op_type in ("MatMul", "MatMulNBits"))


def _output(node: ir.Node) -> tuple[ir.Value, int] | None:
    """The projection's float output (after a constant bias Add) and its width; None for a non-2-D weight."""
    if node.op_type == "MatMulNBits":
        width = node.attributes.get_int("N", 0)
        if not width:
            return None
    else:
        weight = common.constant(node.inputs[1]) if len(node.inputs) > 1 else None
        if weight is None or weight.ndim != 2:
            return None
        width = int(weight.shape[1])
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and users[0].node.op_type == "Add" and not out.is_graph_output():
        add = users[0].node
        bias = common.constant(add.inputs[1 - users[0].idx])
        if bias is not None and bias.size == width:
            return add.outputs[0], width
    return out, width


def _parts(proj: str, out: ir.Value, width: int, where: str) -> list[tuple[str, int]]:
    """The packed parts of a builder projection, read from its consumer; raises RoadError when they cannot be read."""
    names = PACKED.get(proj)
    if names is None:
        return [(proj, width)]
    for use in out.uses():
        consumer = use.node
        if consumer.op_type == "GroupQueryAttention" and use.idx == 0 and proj == "qkv_proj":
            heads = consumer.attributes.get_int("num_heads", 0)
            kv = consumer.attributes.get_int("kv_num_heads", 0)
            if heads and kv and width % (heads + 2 * kv) == 0:
                head = width // (heads + 2 * kv)
                return list(zip(names, (heads * head, kv * head, kv * head), strict=True))
        if consumer.op_type == "Split":
            sizes = common.constant(consumer.inputs[1]) if len(consumer.inputs) > 1 else None
            if sizes is not None and len(sizes) == len(names) and int(sizes.sum()) == width:
                return list(zip(names, (int(s) for s in sizes), strict=True))
            if sizes is None and len(consumer.outputs) == len(names) and width % len(names) == 0:
                return [(n, width // len(names)) for n in names]
    raise RoadError(f"{where}: cannot tell the parts of the packed {proj} ({width} outputs): no GroupQueryAttention "
                    "or Split reads it; attach to a graph built with the projections unpacked")


def builder_linears(model: ir.Model, where: str = "the base") -> list[BuilderLinear]:
    """Every builder projection of the graph with its parts (see the module docstring); raises RoadError when a
    packed projection's parts cannot be read."""
    found = []
    for node in model.graph.all_nodes():
        match = _NODE.match(node.name or "") if node.op_type in ("MatMul", "MatMulNBits") else None
        if match is None:
            continue
        got = _output(node)
        if got is None:
            continue
        out, width = got
        proj = match.group("proj")
        found.append(BuilderLinear(node, int(match.group("layer")), match.group("block"), proj, out, width,
                                   _parts(proj, out, width, where)))
    return found


def locate_module(module: str) -> tuple[int, str, str] | None:
    """peft module path -> (layer, builder block "attn"/"mlp", projection name); None when it is not a layer's
    attention or MLP projection (`model.layers.3.self_attn.q_proj` -> (3, "attn", "q_proj"))."""
    match = _MODULE.search(module)
    if match is None or match.group("block") not in _BLOCKS:
        return None
    return int(match.group("layer")), _BLOCKS[match.group("block")], match.group("proj")


def plan(model: ir.Model, adapters: dict[str, AdapterFile], where: str = "the base") -> list[Placement]:
    """Place every adapter's modules on the builder's projections: one Placement per projection that any adapter
    adapts, in graph order.

    Raises RoadError (one line, nothing written) listing modules with no projection, and for a group of g outputs
    of an adapted part that reaches into the next part (part widths not multiples of g)."""
    linears = builder_linears(model, where)
    index: dict[tuple[int, str, str], tuple[BuilderLinear, int, int]] = {}
    for linear in linears:
        offset = 0
        for part, width in linear.parts:
            index.setdefault((linear.layer, linear.block, part), (linear, offset, width))
            offset += width
        index[(linear.layer, linear.block, linear.proj)] = (linear, 0, linear.width)
    placements: dict[int, Placement] = {}
    for name, adapter in adapters.items():
        problems = []
        for module in adapter.road:
            key = locate_module(module)
            hits = []
            if key is not None and key in index:
                linear, offset, width = index[key]
                hits = [(linear, offset, width, 0)]
            elif key is not None and key[2] in PACKED:  # a packed transformers module the builder wrote unpacked
                source = 0
                for part in PACKED[key[2]]:
                    found = index.get((key[0], key[1], part))
                    if found is None:
                        hits = []
                        break
                    linear, offset, width = found
                    hits.append((linear, offset, width, source))
                    source += width
            if not hits:
                problems.append(module)
                continue
            theta = adapter.road[module]["road_theta"]
            full = module_width(adapter.config.variant, theta.size)
            if full != sum(h[2] for h in hits) or full % adapter.config.group_size:
                raise RoadError(f"{adapter.path}: {module} has {sum(h[2] for h in hits)} outputs in the graph "
                                f"({', '.join(h[0].path for h in hits)}); its {adapter.config.variant} tensors of "
                                f"{theta.size} with group size {adapter.config.group_size} do not fit. Nothing was "
                                "written.")
            for linear, offset, width, source in hits:
                placement = placements.setdefault(id(linear.node), Placement(linear))
                placement.modules.setdefault(name, []).append((module, offset, width, source))
        if problems:
            layers = sorted({f"{lin.block}/{lin.proj}" for lin in linears})
            inside = [n for n in model.graph.all_nodes() if n.op_type == "Attention" and n.domain == "com.microsoft"]
            if inside and all(".self_attn." in m for m in problems):
                raise RoadError(f"{adapter.path}: cannot place {len(problems)} of {len(adapter.road)} adapted "
                                f"module(s) on the model builder's graph {where}: its attention projections are "
                                f"inside onnxruntime's Attention op ({inside[0].name}: the q/k/v weights are that "
                                "op's input, with no product of their own to follow; the builder writes it for "
                                "fp32 on CUDA), so no rotation can follow q/k/v. Build with -p fp16 or bf16 for "
                                "CUDA (--dtype float16), or for the CPU. Nothing was written.")
            raise RoadError(f"{adapter.path}: cannot place {len(problems)} of {len(adapter.road)} adapted module(s) "
                            f"on the model builder's graph {where}: {', '.join(problems[:4])}"
                            + (f" and {len(problems) - 4} more" if len(problems) > 4 else "")
                            + f" (its projections per layer: {', '.join(layers)}). Nothing was written.")
    for placement in placements.values():
        for name, modules in placement.modules.items():
            seen = [m for m, _, _, _ in modules]
            if len(set(seen)) != len(seen) or any(a[1] == b[1] for a in modules for b in modules if a is not b):
                raise RoadError(f"{adapters[name].path}: two modules map to the same part of "
                                f"{placement.linear.path} ({', '.join(seen)}). Nothing was written.")
            _check_straddle(placement.linear, modules, adapters[name])
    order = {id(n): i for i, n in enumerate(model.graph.all_nodes())}
    return sorted(placements.values(), key=lambda p: order[id(p.linear.node)])


def _check_straddle(linear: BuilderLinear, modules: list[tuple[str, int, int, int]], adapter: AdapterFile) -> None:
    """RoadError when a group of g outputs holding an adapted part's outputs reaches over a part boundary."""
    g = adapter.config.group_size
    if len(linear.parts) < 2:
        return
    for module, offset, width, _ in modules:
        if offset % g or width % g:
            bounds = []
            start = 0
            for part, part_width in linear.parts:
                bounds.append(f"{part} {start}:{start + part_width}")
                start += part_width
            raise RoadError(f"{adapter.path}: {module} is outputs {offset}:{offset + width} of the packed "
                            f"{linear.path} ({', '.join(bounds)}), and its group size {g} does not divide the part "
                            f"boundaries, so a rotation group would straddle two parts; build the graph with the parts "
                            f"unpacked (model builder --extra_options fuse_qkv=false, or without fuse_mlp_gate_up) "
                            f"or train with a group size dividing every part width. Nothing was written.")
