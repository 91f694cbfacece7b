"""The one read of a file's dtype, metadata and quantization (`inspection.read_facts`) and the callers that use it.

Planted faults: a file whose metadata claims another dtype than its graph declares; quantized ops that sit only in a
subgraph (an If branch), which a top-level scan misses; a quantize record without quantized nodes, or an unreadable
one. Every reader (the facade, `quantize.quantization` on onnx-ir, `quantize.file_quantization`, `inspect`'s
summary, the harnesses) must say the same. Tiny hand-built graphs: milliseconds each.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from road_export.graph import quantize
from road_export.graph.inspection import METADATA_QUANTIZE, inspect_model, quantization_summary, read_facts

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


def _save(tmp_path, name: str, nodes, outputs, *, inits=(), meta: dict[str, str] | None = None,
          elem: int = FLOAT) -> str:
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info("x", elem, [2, 4])],
                              outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    for key, value in (meta or {}).items():
        model.metadata_props.add(key=key, value=value)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return str(path)


def _float_matmul(tmp_path, name="float", meta=None, elem=FLOAT) -> str:
    weight = numpy_helper.from_array(np.ones((4, 3), np.float16 if elem == HALF else np.float32), "w")
    return _save(tmp_path, name, [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [helper.make_tensor_value_info("y", elem, [2, 3])], inits=[weight], meta=meta, elem=elem)


def _dequantized_in_branch(tmp_path) -> str:
    """A float MatMul at the top; the other branch of an If takes its weight from DequantizeLinear (QDQ): the only
    quantized op sits in a subgraph."""
    q = numpy_helper.from_array(np.ones((4, 3), np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    out = helper.make_tensor_value_info("branch_y", FLOAT, [2, 3])
    quantized = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "scale"], ["wq"]),
                                   helper.make_node("MatMul", ["x", "wq"], ["branch_y"])], "quantized", [], [out])
    plain = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["branch_y"])], "plain", [], [out])
    flag = numpy_helper.from_array(np.array(True), "flag")
    nodes = [helper.make_node("If", ["flag"], ["y"], then_branch=quantized, else_branch=plain)]
    return _save(tmp_path, "branch", nodes, [helper.make_tensor_value_info("y", FLOAT, [2, 3])],
                 inits=[q, scale, w, flag])


def _every_reader(path: str) -> dict[str, str | None]:
    """What each reader says of the file's quantization (the scheme or the ops counted)."""
    return {"read_facts": read_facts(path).quantization,
            "read_facts(proto)": read_facts(onnx.load(path, load_external_data=False)).quantization,
            "quantize.quantization": quantize.quantization(ir.load(path)),
            "quantize.file_quantization": quantize.file_quantization(path)}


def test_dtype_is_the_graphs_not_what_the_metadata_claims(tmp_path):
    """Planted fault: metadata saying float16 on a float32 graph (and float32 on a float16 one) does not move
    the dtype the checks judge by."""
    claims16 = {"road_export.dtype": "float16", "torch_dtype": "float16"}
    lying32 = read_facts(_float_matmul(tmp_path, "lying32", meta=claims16))
    assert lying32.dtype == "float32" and lying32.metadata["torch_dtype"] == "float16"
    lying16 = read_facts(_float_matmul(tmp_path, "lying16", meta={"torch_dtype": "float32"}, elem=HALF))
    assert lying16.dtype == "float16"
    assert read_facts(_float_matmul(tmp_path)).dtype == "float32"


def test_a_float_file_is_float_everywhere(tmp_path):
    path = _float_matmul(tmp_path)
    assert set(_every_reader(path).values()) == {None}
    assert read_facts(path).quantized_ops == {} and read_facts(path).summary is None
    assert inspect_model(path).quantization is None


def test_quantized_ops_in_a_subgraph_are_seen_by_every_reader(tmp_path):
    """Planted fault: the only quantized op is inside an If branch. A top-level scan (inspect's former summary,
    the CLI's former check) called this file float; every reader now counts it alike."""
    path = _dequantized_in_branch(tmp_path)
    readers = _every_reader(path)
    assert set(readers.values()) == {"1 DequantizeLinear"}, readers
    assert read_facts(path).quantized_ops == {"DequantizeLinear": 1}
    assert quantization_summary(path) == "1 DequantizeLinear (not recorded by road-export)"
    assert inspect_model(path).quantization == quantization_summary(path)


@pytest.mark.parametrize("record,scheme", [
    (json.dumps({"scheme": "int4", "bits": 4, "block_size": 16}), "int4"),
    ("not json", "not json"),  # an unreadable record is named as it is, by every reader
])
def test_the_quantize_record_decides_everywhere(tmp_path, record, scheme):
    """A file with road_export.graph.quantize's record is quantized by it, quantized nodes or not, for every reader."""
    path = _float_matmul(tmp_path, "recorded", meta={METADATA_QUANTIZE: record})
    readers = _every_reader(path)
    assert set(readers.values()) == {scheme}, readers
    summary = read_facts(path).summary
    assert summary is not None and summary.startswith(scheme)
    if scheme == "int4":
        assert summary == "int4 (MatMulNBits, blocks of 16; 0 of 1 MatMul weights)"


def test_the_file_against_file_check_reads_the_same_facts(tmp_path):
    """verify --against judges a pair as quantized through the same facts: the subgraph-only file against its
    float twin is compared by cosine, so --atol is refused (the line names the ops read_facts counts)."""
    from road_export.core.errors import RoadError
    from road_export.app.parity.file_reference import verify_against_file

    quantized, plain = _dequantized_in_branch(tmp_path), _float_matmul(tmp_path)
    with pytest.raises(RoadError, match="1 DequantizeLinear-quantized"):
        verify_against_file(quantized, plain, atol=1e-3)


def test_the_facade_and_the_torch_free_harness_import_without_torch(tmp_path):
    """A serving host checks a file against a trusted one without torch: the facade, the parity package's
    torch-free modules and `road-export verify --against`'s entry import with torch blocked."""
    from test_floor import BLOCK_TORCH, run_python

    path = _dequantized_in_branch(tmp_path)
    done = run_python(BLOCK_TORCH + f"""
import sys
import road_export.app.parity, road_export.app.parity.cases, road_export.app.parity.feeds
import road_export.app.parity.file_reference
from road_export.graph.inspection import read_facts
print(read_facts({path!r}).quantization)
assert not [m for m in ("torch", "transformers", "peft") if m in sys.modules]
""", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "1 DequantizeLinear", done.stderr[-2000:]
