"""Quantized bases with float RoAd on top, torch-free: onnxruntime's own weight-only quantizer on the MatMul weights.

`quantize_model` runs `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` (its default
algorithm: round to nearest, asymmetric, one scale and zero point per block of input rows) on every MatMul whose
weight is a constant initializer: each becomes a `com.microsoft.MatMulNBits` node. Nothing else changes: `road`
nodes, their C1/C2 coefficients (swappable graph inputs with defaults, or constants), Gather embeddings, norms and
biases stay float, so an `.onnx_adapter` file still swaps adapters per Run on the quantized file and
`attach --mode rotate` still places a rotation after a quantized layer.

The schemes:
- `int8`: 8 bits, blocks of `INT8_BLOCK_SIZE` = 32, every MatMul.
- `int4`: 4 bits, blocks of `INT4_BLOCK_SIZE` = 16 (the finest block MatMulNBits takes), except where 4 bits cost
  most accuracy, which get int8 (blocks of 32): the MatMuls of the first `INT8_LAYERS` = 2 numbered layers (at most
  a quarter of them) and those outside every numbered layer (the output head). An error made in an early layer
  passes through, and is amplified by, every layer after it: on the 8-layer random-weight model of
  tools/bench_scale.py, int4 in layer 0 alone costs as much cosine as int4 in all the other layers together, int4
  in layer 7 alone next to nothing. Measured there against peft float32 (cosine of the logits; batch 1 seq 1 /
  batch 3 seq 7 / batch 2 seq 33 / vocabulary sweep / seq 256; file size / float32):
    all int4, blocks of 32                     0.948 / 0.911 / 0.890 / 0.860 / 0.865   0.274
    all int4, blocks of 16                     0.956 / 0.933 / 0.917 / 0.893 / 0.894   0.305
    all int4, HQQ blocks of 16                 0.964 / 0.948 / 0.931 / 0.909 / 0.912   0.352
    int4 (this scheme)                         0.990 / 0.987 / 0.985 / 0.984 / 0.985   0.335
    all int8, blocks of 32                     0.9998 / 0.9997 / 0.9996 / 0.9994 / 0.9995   0.386
  The layers are read from the exporter's module path on each node (`pkg.torch.onnx.name_scopes`, e.g.
  `model.layers.0.mlp.down_proj`: a `layers`/`layer`/`h`/`block`/`blocks` index); a file without it is int4 all
  through.

The quantizer names each new node `<MatMul name>_Q<bits>` but drops the node's metadata; the exporter's module
path is copied back onto it, which is how `attach` finds the layer of a quantized node. The file records
`road_export.graph.quantize` = {"scheme", "bits", "block_size", "int8_nodes", "int8_block_size", "int8_layers",
"quantizer"} in its metadata.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from road_export.core.errors import RoadError
from road_export.graph.inspection import METADATA_QUANTIZE, QUANTIZED_OPS, quantization_of, read_facts, recorded_scheme

__all__ = [
    "BLOCK_SIZE", "INT4_BLOCK_SIZE", "INT8_BLOCK_SIZE", "INT8_LAYERS", "METADATA_QUANTIZE", "QUANTIZED_OPS",
    "SCHEMES", "QuantizeReport", "gemm_as_matmul", "int8_nodes", "layer_index", "quantization", "quantize_file",
    "quantize_model", "recorded_scheme",
]

SCHEMES = {"int4": 4, "int8": 8}
INT4_BLOCK_SIZE = 16
INT8_BLOCK_SIZE = 32
BLOCK_SIZE = {"int4": INT4_BLOCK_SIZE, "int8": INT8_BLOCK_SIZE}
INT8_LAYERS = 2  # the first numbered layers an int4 file keeps at int8 (at most a quarter of the layers)
# METADATA_QUANTIZE (the record's key) and QUANTIZED_OPS live in road_export.graph.inspection, beside the one rule
# (`inspection.quantization_of`) that reads them
_SCOPES = "pkg.torch.onnx.name_scopes"
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)(?:\.|$)")


@dataclass
class QuantizeReport:
    """What `quantize_model` did: the scheme, its bits and block size, how many MatMul weights it quantized in all
    (`quantized`) and how many of them an int4 file keeps at int8 (`int8_nodes`, blocks of INT8_BLOCK_SIZE)."""

    scheme: str
    bits: int
    block_size: int
    quantized: int
    int8_nodes: int = 0


def quantization(model: ir.Model) -> str | None:
    """How `model` is quantized already: its `road_export.graph.quantize` scheme, or its quantized nodes counted by op
    type, most first ("15 MatMulInteger, 1 DequantizeLinear"; MatMulNBits, MatMulInteger, QLinearMatMul,
    DequantizeLinear, ...); None for a float model. The rule is `inspection.quantization_of`, the one a file's
    `inspection.read_facts` applies."""
    return quantization_of(model.metadata_props, Counter(node.op_type for node in model.graph.all_nodes()))


def file_quantization(path: str | os.PathLike) -> str | None:
    """`quantization` of an ONNX file, its graph read without its weights (`inspection.read_facts`)."""
    return read_facts(path).quantization


def check_scheme(scheme: str) -> int:
    """The bit width of `scheme` ("int4" -> 4, "int8" -> 8); RoadError naming the choices otherwise."""
    if scheme not in SCHEMES:
        raise RoadError(f"--quantize {scheme}: unknown bit width; choose {' or '.join(SCHEMES)}")
    return SCHEMES[scheme]


def layer_index(node: ir.Node) -> int | None:
    """The numbered layer (`...layers.N...`, `h.N`, `layer.N`, `block.N`) of the module that the exporter recorded
    as the node's deepest scope (`pkg.torch.onnx.name_scopes`); None outside numbered layers or without a record."""
    text = node.metadata_props.get(_SCOPES)
    if not text:
        return None
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    for scope in reversed(scopes if isinstance(scopes, list) else []):
        match = _LAYER.search(str(scope))
        if match:
            return int(match.group(1))
    return None


def int8_nodes(model: ir.Model, layers: int = INT8_LAYERS) -> tuple[set[str], int]:
    """(names of the MatMul nodes with a constant weight that an int4 file keeps at int8, how many first layers
    that is): those of the first min(`layers`, L // 4) numbered layers (L: the number of layers) and those outside
    every numbered layer (the output head). Nothing when no such node records a module path (another exporter's
    file: int4 all through)."""
    matmuls = [n for n in model.graph.all_nodes() if n.op_type == "MatMul" and len(n.inputs) == 2
               and n.inputs[1] is not None and n.inputs[1].const_value is not None]
    if not any(_SCOPES in n.metadata_props for n in matmuls):
        return set(), 0
    index = {n.name: layer_index(n) for n in matmuls}
    numbered = [i for i in index.values() if i is not None]
    if not numbered:
        return set(), 0
    first = min(layers, (max(numbered) + 1) // 4)
    return {name for name, i in index.items() if i is None or i < first}, first


def _name_nodes(model: ir.Model) -> None:
    """Give every MatMul a unique name: the quantizer picks nodes by name (nodes_to_exclude)."""
    seen: set[str] = set()
    for i, node in enumerate(n for n in model.graph.all_nodes() if n.op_type == "MatMul"):
        if not node.name or node.name in seen:
            node.name = f"road_export_MatMul_{i}"
        seen.add(node.name)


def gemm_as_matmul(model: ir.Model) -> int:
    """Rewrite, in place, each top-level Gemm with a constant 2-D weight (alpha = beta = 1, transA = 0: torch's
    addmm, as GPT-2's Conv1D and other `x @ W + b` layers export) as MatMul(A, W) followed by Add(bias) when it has
    one, so onnxruntime's quantizer (MatMul only) takes it. A transB weight is transposed into a new initializer,
    one weight at a time. The Gemm's output value (its name and every consumer, a `road` rotation included) is
    kept; the MatMul takes the Gemm's name and metadata (module paths, read by `int8_nodes`). Returns how many."""
    import numpy as np

    graph = model.graph
    inputs = {id(v) for v in graph.inputs}
    count = 0
    for node in list(graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        attrs = node.attributes
        if attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0 or \
                attrs.get_int("transA", 0):
            continue
        a, weight = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if weight is None or weight.const_value is None or id(weight) in inputs or \
                weight.name not in graph.initializers or len(weight.const_value.shape) != 2:
            continue
        if attrs.get_int("transB", 0):
            array = np.ascontiguousarray(weight.const_value.numpy().T)
            transposed = ir.Value(name=f"{weight.name}_transposed", shape=ir.Shape(array.shape),
                                  type=ir.TensorType(weight.const_value.dtype), const_value=ir.tensor(array))
            graph.register_initializer(transposed)
            weight = transposed
        output = node.outputs[0]
        matmul = ir.node("MatMul", [a, weight], name=node.name or None)
        matmul.metadata_props.update(node.metadata_props)
        new_nodes = [matmul]
        result = matmul.outputs[0]
        if bias is not None:
            add = ir.node("Add", [result, bias], name=f"{node.name}_bias" if node.name else None)
            new_nodes.append(add)
            result = add.outputs[0]
        result.shape, result.type = output.shape, output.type
        name = output.name
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [output], [result])
        result.name = name
        count += 1
    return count


def quantize_model(model: ir.Model, scheme: str, *, block_size: int | None = None, int8_layers: int = INT8_LAYERS,
                   where: str = "") -> tuple[ir.Model, QuantizeReport]:
    """`model` with its MatMul weights quantized by onnxruntime's MatMulNBitsQuantizer (`scheme` int4 or int8, see
    the module docstring), as a new onnx-ir model; `model` itself is serialised to a protobuf for the quantizer (its
    weights are read; unnamed MatMul nodes get names). `block_size` overrides the scheme's 4- or 8-bit block size
    (16 to 256, a power of two); `int8_layers=0` keeps only the output head of an int4 file at int8.

    Float weights of any dtype (float32, float16) in, MatMulNBits with uint8 packed weights and scales of the
    weight's dtype out. Gemm layers with a constant weight are rewritten as MatMul first (`gemm_as_matmul`) and
    quantized alike. Raises RoadError for an unknown scheme, a model that is quantized already
    (`quantization`), or one without a MatMul with a constant weight. `where` names the file in messages.
    """
    bits = check_scheme(scheme)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or not 16 <= block_size <= 256 or block_size & (block_size - 1)):
        raise RoadError(f"block_size {block_size!r}: MatMulNBits takes blocks of 16 to 256 rows, a power of two "
                        "(16, 32, 64, 128, 256); choose one of those, or None for the scheme's")
    already = quantization(model)
    if already is not None:
        raise RoadError(f"{where or 'the model'}: is quantized already ({already}); --quantize takes a float "
                        "model (quantize the float export or base instead)")
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    block_size = block_size or BLOCK_SIZE[scheme]
    gemm_as_matmul(model)
    _name_nodes(model)
    keep, first = int8_nodes(model, int8_layers) if bits == 4 else (set(), 0)
    scopes = {n.name: dict(n.metadata_props) for n in model.graph.all_nodes() if n.op_type == "MatMul" and n.name}
    base_dir = _external_base_dir(model)
    proto = ir.serde.serialize_model(model)  # external tensors stay references: the quantizer reads them one by one
    # one quantizer run per bit width: int8 on the nodes kept at 8 bits, then the scheme's bits on the MatMuls left
    runs = [(8, INT8_BLOCK_SIZE, [n for n in scopes if n not in keep])] if keep else []
    runs.append((bits, block_size, []))
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with _working_directory(base_dir):  # onnx resolves external data paths against the working directory
            for run_bits, run_block, exclude in runs:
                config = DefaultWeightOnlyQuantConfig(block_size=run_block, is_symmetric=False, bits=run_bits,
                                                      op_types_to_quantize=("MatMul",))
                quantizer = MatMulNBitsQuantizer(proto, bits=run_bits, block_size=run_block, is_symmetric=False,
                                                 nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",),
                                                 algo_config=config)
                del proto
                quantizer.process()
                proto = quantizer.model.model
                del quantizer
    finally:
        logger.setLevel(level)
    result = ir.serde.deserialize_model(proto)
    del proto
    if base_dir is not None:
        ir.external_data.set_base_dir(result.graph, base_dir)  # float weights left as they were: still in `.data`
    count = eights = 0
    for node in result.graph.all_nodes():
        if node.op_type == "MatMulNBits":
            count += 1
            node_bits = node.attributes.get_int("bits", bits)
            eights += node_bits == 8 and bits == 4
            original = scopes.get(node.name.removesuffix(f"_Q{node_bits}")) if node.name else None
            if original:
                for key, value in original.items():
                    node.metadata_props.setdefault(key, value)
    if not count:
        raise RoadError(f"{where or 'the model'}: has no MatMul with a constant weight to quantize")
    result.metadata_props[METADATA_QUANTIZE] = json.dumps({
        "scheme": scheme, "bits": bits, "block_size": block_size, "int8_nodes": eights,
        "int8_block_size": INT8_BLOCK_SIZE, "int8_layers": first,
        "quantizer": "onnxruntime.quantization.MatMulNBitsQuantizer (RTN, asymmetric)"})
    return result, QuantizeReport(scheme, bits, block_size, count, eights)


def _external_base_dir(model: ir.Model) -> str | None:
    """The directory of the model's external data files (None when it has none)."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return str(value.const_value.base_dir)
    return None


@contextlib.contextmanager
def _working_directory(path: str | None) -> Iterator[None]:
    """Run the block in `path` (nothing when None): onnxruntime's quantizer reads an external tensor through
    `onnx.numpy_helper.to_array`, relative to the working directory, so each weight is read when it is quantized
    instead of the whole model being loaded first."""
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_file(source: str | os.PathLike, target: str | os.PathLike, scheme: str, *,
                  block_size: int | None = None, external_data: bool | None = None,
                  check: Callable[[Path], None] | None = None) -> QuantizeReport:
    """Quantize the ONNX file `source` into `target` (atomically; `external_data` and `check` as for
    `files.save_model`, which decides by size when None). A source with external data is read one weight at a
    time. RoadError as for `quantize_model`, or for paths that cannot be read/written."""
    from road_export.graph.files import load_for_rewrite, save_model

    model, _ = load_for_rewrite(source, target)
    quantized, report = quantize_model(model, scheme, block_size=block_size, where=str(source))
    del model
    save_model(quantized, Path(target), external_data, check=check)
    return report
