"""Quantized bases with float RoAd on top, torch-free: onnxruntime's own weight-only quantizer on the MatMul weights.

`quantize_model` runs `onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer` (RTN, asymmetric, one
scale and zero point per block of `BLOCK_SIZE` = 32 input rows) on every MatMul whose weight is a constant
initializer: each becomes a `com.microsoft.MatMulNBits` node with `bits` = 4 (int4) or 8 (int8). Nothing else
changes: `road` nodes, their C1/C2 coefficients (swappable graph inputs with defaults, or constants), Gather
embeddings, norms and biases stay float, so an `.onnx_adapter` file still swaps adapters on the quantized file
and `attach --mode rotate` still places a rotation after a quantized layer.

Block size 32: the finest block onnxruntime's kernels take; for random and trained weights it keeps the cosine of
the logits against the float model well above 0.98 (tests/test_quantize.py), at 4 + 32/32 + 4/32 ~ 5.1 bits per
int4 weight (~0.16 of float32, ~0.32 of float16); embeddings stay float.

The quantizer names each new node `<MatMul name>_Q<bits>` but drops the node's metadata; the exporter's module
path (`pkg.torch.onnx.name_scopes`) is copied back onto it, which is how `attach` finds the layer of a quantized
node. The file records `road_export.quantize` = {"scheme", "bits", "block_size", "quantizer"} in its metadata.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from road_export.errors import RoadError

__all__ = [
    "BLOCK_SIZE", "METADATA_QUANTIZE", "QUANTIZED_OPS", "SCHEMES", "QuantizeReport", "quantization",
    "quantize_file", "quantize_model",
]

SCHEMES = {"int4": 4, "int8": 8}
BLOCK_SIZE = 32
METADATA_QUANTIZE = "road_export.quantize"
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                           "MatMulIntegerToFloat", "QGemm", "DequantizeLinear", "GatherBlockQuantized"})
_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class QuantizeReport:
    """What `quantize_model` did: the scheme, bits, block size and how many MatMul weights it quantized."""

    scheme: str
    bits: int
    block_size: int
    quantized: int


def quantization(model: ir.Model) -> str | None:
    """How `model` is quantized already: its `road_export.quantize` scheme, or the first quantized op type found
    (MatMulNBits, MatMulInteger, QLinearMatMul, DequantizeLinear, ...); None for a float model."""
    record = model.metadata_props.get(METADATA_QUANTIZE)
    if record:
        try:
            return json.loads(record)["scheme"]
        except (ValueError, KeyError, TypeError):
            return record
    for node in model.graph.all_nodes():
        if node.op_type in QUANTIZED_OPS:
            return node.op_type
    return None


def check_scheme(scheme: str) -> int:
    """The bit width of `scheme` ("int4" -> 4, "int8" -> 8); RoadError naming the choices otherwise."""
    if scheme not in SCHEMES:
        raise RoadError(f"--quantize {scheme}: unknown bit width; choose {' or '.join(SCHEMES)}")
    return SCHEMES[scheme]


def quantize_model(model: ir.Model, scheme: str, *, block_size: int = BLOCK_SIZE, where: str = "") -> tuple[
        ir.Model, QuantizeReport]:
    """`model` with its MatMul weights quantized by onnxruntime's MatMulNBitsQuantizer (`scheme` int4 or int8),
    as a new onnx-ir model; `model` itself is serialised to a protobuf for the quantizer (its weights are read).

    Raises RoadError for an unknown scheme, a model that is quantized already (`quantization`), or one without
    a MatMul with a constant weight. `where` names the file in messages.
    """
    bits = check_scheme(scheme)
    already = quantization(model)
    if already is not None:
        raise RoadError(f"{where or 'the model'}: is quantized already ({already}); --quantize takes a float "
                        "model (quantize the float export or base instead)")
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    scopes = {n.name: dict(n.metadata_props) for n in model.graph.all_nodes() if n.op_type == "MatMul" and n.name}
    base_dir = _external_base_dir(model)
    proto = ir.serde.serialize_model(model)  # external tensors stay references: the quantizer reads them one by one
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=bits,
                                          op_types_to_quantize=("MatMul",))
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = logger.level
    logger.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        with _working_directory(base_dir):  # onnx resolves external data paths against the working directory
            quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size, is_symmetric=False,
                                             op_types_to_quantize=("MatMul",), algo_config=config)
            del proto
            quantizer.process()
    finally:
        logger.setLevel(level)
    result = ir.serde.deserialize_model(quantizer.model.model)
    del quantizer
    if base_dir is not None:
        ir.external_data.set_base_dir(result.graph, base_dir)  # float weights left as they were: still in `.data`
    count = 0
    suffix = f"_Q{bits}"
    for node in result.graph.all_nodes():
        if node.op_type == "MatMulNBits":
            count += 1
            original = scopes.get(node.name.removesuffix(suffix)) if node.name else None
            if original:
                for key, value in original.items():
                    node.metadata_props.setdefault(key, value)
    if not count:
        raise RoadError(f"{where or 'the model'}: has no MatMul with a constant weight to quantize")
    result.metadata_props[METADATA_QUANTIZE] = json.dumps({
        "scheme": scheme, "bits": bits, "block_size": block_size,
        "quantizer": "onnxruntime.quantization.MatMulNBitsQuantizer (RTN, asymmetric)"})
    return result, QuantizeReport(scheme, bits, block_size, count)


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
                  block_size: int = BLOCK_SIZE, external_data: bool | None = None,
                  check: Callable[[Path], None] | None = None) -> QuantizeReport:
    """Quantize the ONNX file `source` into `target` (atomically; `external_data` and `check` as for
    `files.save_model`, which decides by size when None). A source with external data is read one weight at a
    time. RoadError as for `quantize_model`, or for paths that cannot be read/written."""
    from road_export.files import load_for_rewrite, save_model

    model, _ = load_for_rewrite(source, target)
    quantized, report = quantize_model(model, scheme, block_size=block_size, where=str(source))
    del model
    save_model(quantized, Path(target), external_data, check=check)
    return report
