"""merge_decoders: optimum's merged decoder, one file holding the decoder without and with past behind an If.

optimum (`optimum/onnx/graph_transformations.py`, `merge_decoders`) writes `decoder_model_merged.onnx` beside an
encoder-decoder's two decoder files; transformers.js loads only that one, ORTModelForSeq2SeqLM either. Its graph is
one node:

    If(use_cache_branch: bool [1]) -> the decoder's outputs, in the decoder's order
        then: decoder_with_past_model.onnx's graph   (present.{i}.encoder.* passed through from the past inputs:
                                                      the encoder's keys/values do not change once cached)
        else: decoder_model.onnx's graph

Inputs are the union of both files' (the decoder's first) plus `use_cache_branch`. Initializers move to the outer
graph: equal name and content are one initializer, equal content under another name is reused, a clashing name
gets its branch prefix. Each branch's node outputs and node names get a prefix (`wp/` with past, `np/` without), so
no name appears twice in the file. Graph inputs that carry a value (a swappable export's coefficients) stay inputs:
they are never replaced by a constant of equal content. Opsets, metadata (the swap records: the decoder's layers, a
superset of the other's) and ir_version are the decoder's; the road functions are the union of both files'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import onnx_ir as ir

__all__ = ["MergeDecodersPass", "MergeDecodersResult", "USE_CACHE_BRANCH"]

logger = logging.getLogger(__name__)
USE_CACHE_BRANCH = "use_cache_branch"  # optimum's name of the If's condition input
WITH_PAST, WITHOUT_PAST = "wp/", "np/"  # optimum's branch prefixes


@dataclasses.dataclass
class MergeDecodersResult(ir.passes.PassResult):
    """The pass result plus how many of the decoder's initializers are the with-past decoder's (by name or
    content), stored once for both branches."""

    shared: int = 0


def _name(value: ir.Value) -> str:
    if not value.name:
        raise ValueError("merge_decoders: a graph input, output or initializer without a name")
    return value.name


def _content(value: ir.Value) -> tuple:
    tensor = value.const_value
    assert tensor is not None
    return tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).hexdigest()


class MergeDecodersPass(ir.passes.FunctionalPass):
    """Merge the decoder without past (the model the pass is called on) and `with_past` into optimum's merged
    decoder (see the module docstring); returns a new model, neither input is modified (both are cloned; tensors
    are shared, not copied). Raises ValueError when `with_past` lacks a past input for a cross-attention present
    output of the decoder, or a graph output is not computed by a node."""

    def __init__(self, with_past: ir.Model) -> None:
        super().__init__()
        self.with_past = with_past

    def call(self, model: ir.Model) -> MergeDecodersResult:
        decoder, with_past = model.clone(), self.with_past.clone()
        order = [_name(v) for v in decoder.graph.outputs]
        out_types = {_name(v): (v.type, v.shape) for v in decoder.graph.outputs}
        outer: dict[str, ir.Value] = {}  # the merged graph's inputs by name
        inits: dict[str, ir.Value] = {}  # the merged graph's initializers by name
        by_content: dict[tuple, ir.Value] = {}
        branches = {}
        shared = 0
        for part, prefix in ((decoder, WITHOUT_PAST), (with_past, WITH_PAST)):  # inputs: the decoder's first
            graph = part.graph
            for value in list(graph.inputs):
                name = _name(value)
                graph.inputs.remove(value)
                if name in graph.initializers:
                    graph.initializers.pop(name)
                known = outer.get(name)
                if known is None:
                    outer[name] = value
                    if value.const_value is not None:
                        inits[name] = value
                elif value.const_value is None or (known.const_value is not None and
                                                   _content(known) == _content(value)):
                    value.replace_all_uses_with(known)
                else:  # an input of the same name with another default: this branch's own constant
                    value.name = prefix + name
                    inits[value.name] = value
        for part, prefix in ((with_past, WITH_PAST), (decoder, WITHOUT_PAST)):  # optimum's order: with past first
            graph = part.graph
            outputs = {_name(v): v for v in graph.outputs}
            for value in list(graph.initializers.values()):
                name = _name(value)
                graph.initializers.pop(name)
                key = _content(value)
                same = inits.get(name)
                if same is not None and name not in outer and _content(same) == key:
                    value.replace_all_uses_with(same)
                    shared += part is decoder
                elif key in by_content:
                    value.replace_all_uses_with(by_content[key])
                    shared += part is decoder
                else:
                    if name in inits or name in outer:
                        name = value.name = prefix + name
                    inits[name] = value
                    by_content[key] = value
            nodes = list(graph)
            graph.remove(nodes, safe=False)
            graph.outputs.clear()
            for node in (n for top in nodes for n in (top, *_inner_nodes(top))):
                node.name = prefix + node.name if node.name else node.name
                for value in node.outputs:
                    if value.name:
                        value.name = prefix + value.name
            if part is with_past:
                for name in order:
                    if name.startswith("present.") and ".encoder." in name and name not in outputs:
                        past = "past_key_values." + name[len("present."):]
                        if past not in outer:
                            raise ValueError(f"merge_decoders: {name} has no past input {past} to pass through")
                        node = ir.node("Identity", [outer[past]], name=f"{prefix}{name}/Identity")
                        node.outputs[0].name = prefix + name
                        node.outputs[0].type, node.outputs[0].shape = outer[past].type, outer[past].shape
                        nodes.append(node)
                        outputs[name] = node.outputs[0]
            for name in order:
                if outputs[name].producer() is None:
                    raise ValueError(f"merge_decoders: output {name} is not computed by a node")
            branches[prefix] = ir.Graph((), [outputs[n] for n in order], nodes=nodes,
                                        name=prefix.strip("/") + "_branch")
        condition = ir.Value(name=USE_CACHE_BRANCH, type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([1]))
        node = ir.node("If", [condition], {"then_branch": branches[WITH_PAST], "else_branch": branches[WITHOUT_PAST]},
                       num_outputs=len(order), name="optimum::if")
        for value, name in zip(node.outputs, order, strict=True):
            value.name = name
            value.type, value.shape = out_types[name]
        graph = ir.Graph([*outer.values(), condition], node.outputs, nodes=[node], initializers=list(inits.values()),
                         opset_imports=dict(decoder.opset_imports), name="decoder_model_merged")
        functions = {**with_past.functions, **decoder.functions}
        merged = ir.Model(graph, ir_version=decoder.ir_version, producer_name=decoder.producer_name,
                          producer_version=decoder.producer_version, functions=list(functions.values()),
                          metadata_props=dict(decoder.metadata_props))
        logger.info("merge_decoders: %d outputs behind one If, %d initializers shared", len(order), shared)
        return MergeDecodersResult(merged, modified=True, shared=shared)


def _inner_nodes(node: ir.Node):
    """The nodes of `node`'s subgraphs, at any depth."""
    for attr in node.attributes.values():
        graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else \
            list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
        for graph in graphs:
            yield from graph.all_nodes()
