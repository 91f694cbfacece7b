"""One RoAd rotation over a [512, 4096] fp32 tensor on onnxruntime, against a single elementwise Mul.

Side by side in one run (interleaved, 2 intra-op threads):
  - road.Rotate and road.RotateTied on the native kernels (`road-export kernels`, what RoadSession runs)
and each standard-op body road-export writes, for runtimes without the kernels:
  - road.RotateTied (road_1 after `lower`): one RotaryEmbedding, com.microsoft (opset 20) and standard (opset 23)
  - road.Rotate (road_2/road_4; the standard body): reversed Slice + Mul, Mul, Add
  - the Split/Neg/Concat body (the Slice-based standard-op rotation)
  - what torch.onnx.export writes for peft's layer (Reshape, Gather, Neg, Unsqueeze, Concat, Reshape, Mul, Mul, Add)

Then the native kernels in float16 and bfloat16 against a float16 Mul (the same bytes read and written;
onnxruntime has no bfloat16 Mul on the CPU).

    python tools/bench_rotation.py [--rows 512] [--width 4096] [--group 64] [--rounds 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the pass tests' small graphs

from road_export.graph import native  # noqa: E402
from road_export.core import rotation  # noqa: E402
from road_export.graph import ops as road_op  # noqa: E402
from road_export.passes.lower import LowerPass  # noqa: E402
from passes import testutil  # noqa: E402


def build(nodes, inits, shape, opsets, dtype=TensorProto.FLOAT) -> bytes:
    x = helper.make_tensor_value_info("x", dtype, shape)
    y = helper.make_tensor_value_info("y", dtype, shape)
    tensors = [bf16_tensor(v, k) if dtype == TensorProto.BFLOAT16 else numpy_helper.from_array(v, k)
               for k, v in inits.items()]
    graph = helper.make_graph(nodes, "bench", [x], [y], tensors)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(*o) for o in opsets])
    model = ir.serde.deserialize_model(proto)
    if any(n.domain == road_op.DOMAIN for n in model.graph):
        LowerPass("onnxruntime")(model)
    return ir.serde.serialize_model(model).SerializeToString()


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    bits = a.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_tensor(a: np.ndarray, name: str):
    return helper.make_tensor(name, TensorProto.BFLOAT16, a.shape, bf16_bits(a).tobytes(), raw=True)


def road_node(c1, c2, g, opset):
    node = helper.make_node(road_op.OP_TYPE, ["x", "c1", "c2"], ["y"], domain=road_op.DOMAIN, group_size=g)
    return [node], {"c1": c1, "c2": c2}, [("", opset), (road_op.DOMAIN, road_op.VERSION)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    n, d, g = args.rows, args.width, args.group
    rng = np.random.default_rng(0)
    tied = testutil.coefficients("road_1", d, g, rng)
    full = testutil.coefficients("road_4", d, g, rng)
    shape = [n, d]

    models: dict[str, tuple[bytes, tuple]] = {}
    models["Mul (reference)"] = (build([helper.make_node("Mul", ["x", "c1"], ["y"])], {"c1": full[0]}, shape,
                                       [("", 20)]), None)
    def road(coeffs, opset=20):
        nodes, inits, opsets = road_node(*coeffs, g, opset)
        return build(nodes, inits, shape, opsets), coeffs

    models["road_4 Rotate, native kernel"] = road(full)
    models["road_1 RotateTied, native kernel"] = road(tied)
    models["road_1 RotateTied body, opset 20"] = road(tied)
    models["road_1 RotateTied body, opset 23"] = road(tied, 23)
    models["road_4 Rotate body"] = road(full)
    h = g // 2
    split_nodes = [
        helper.make_node("Reshape", ["x", "grouped"], ["xg"]),
        helper.make_node("Split", ["xg"], ["x1", "x2"], axis=1, num_outputs=2),
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", ["nx2", "x1"], ["r"], axis=1),
        helper.make_node("Reshape", ["r", "full_shape"], ["rot"]),
        helper.make_node("Mul", ["x", "c1"], ["p1"]),
        helper.make_node("Mul", ["rot", "c2"], ["p2"]),
        helper.make_node("Add", ["p1", "p2"], ["y"]),
    ]
    models["road_4 Split/Concat body"] = (build(split_nodes, {"c1": full[0], "c2": full[1], "grouped": np.array(
        [-1, 2, h]), "full_shape": np.array(shape)}, shape, [("", 20)]), full)
    peft_form = testutil.decomposed_model(1, d, g, "road_4")  # reuse its rotation nodes, fed by x directly
    peft_nodes = [ir.serde.serialize_node(node) for node in peft_form.graph if node.op_type != "MatMul"]
    for node in peft_nodes:
        for i, name in enumerate(node.input):
            if name == "h":
                node.input[i] = "x"
    inits = {k: v.const_value.numpy() for k, v in peft_form.graph.initializers.items() if k not in ("w", "b")}
    inits["first_col"], inits["second_col"] = full
    peft_nodes = [nd for nd in peft_nodes if nd.op_type != "Add" or "p1" in nd.input]
    models["road_4 as peft traces it"] = (build(peft_nodes, inits, shape, [("", 20)]), full)

    import onnxruntime as ort

    def session(name: str, model: bytes):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        native.register(options, "native kernel" in name)
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    sessions = {k: session(k, m) for k, (m, _) in models.items()}
    x = rng.standard_normal((n, d)).astype(np.float32)
    for name, (_, coeffs) in models.items():
        if coeffs is not None:
            err = np.abs(sessions[name].run(None, {"x": x})[0] - rotation.rotate(x, *coeffs, g)).max()
            assert err < 1e-4, (name, err)
    for s in sessions.values():
        for _ in range(10):
            s.run(None, {"x": x})
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(args.rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"x": x})
            times[name].append(time.perf_counter() - start)
    base = times["Mul (reference)"]
    print(f"one rotation over [{n}, {d}] fp32, g={g}, onnxruntime 2 threads, {args.rounds} interleaved rounds")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base, strict=True))
        print(f"  {name:>34}: {statistics.median(t) * 1e3:8.3f} ms   {ratio:6.2f}x a single Mul")

    # float16 and bfloat16: the native kernels against a float16 Mul, fed as OrtValues (numpy has no bfloat16)
    half_models = {"Mul fp16 (reference)": (build([helper.make_node("Mul", ["x", "c1"], ["y"])],
                                                  {"c1": full[0].astype(np.float16)}, shape, [("", 20)],
                                                  TensorProto.FLOAT16), TensorProto.FLOAT16)}
    for label, dt in (("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)):
        for variant, coeffs in (("road_4 Rotate", full), ("road_1 RotateTied", tied)):
            nodes, _, opsets = road_node(*coeffs, g, 20)
            cast = {"c1": coeffs[0], "c2": coeffs[1]} if dt == TensorProto.BFLOAT16 else {
                "c1": coeffs[0].astype(np.float16), "c2": coeffs[1].astype(np.float16)}
            half_models[f"{variant} {label}, native kernel"] = (build(nodes, cast, shape, opsets, dt), dt)
    half_sessions = {k: session("native kernel" if "native" in k else k, m) for k, (m, _) in half_models.items()}
    values = {TensorProto.FLOAT16: ort.OrtValue.ortvalue_from_numpy(x.astype(np.float16)),
              TensorProto.BFLOAT16: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(bf16_bits(x),
                                                                                    TensorProto.BFLOAT16)}
    for name, s in half_sessions.items():
        dt = half_models[name][1]
        got = s.run_with_ort_values(["y"], {"x": values[dt]})[0]
        if "native" in name and dt == TensorProto.FLOAT16:  # bfloat16 has no numpy view: tests/test_native.py
            coeffs = full if "road_4" in name else tied
            err = np.abs(got.numpy().astype(np.float32) - rotation.rotate(x, *coeffs, g)).max() / np.abs(x).max()
            assert err < 4e-3, (name, err)
        for _ in range(10):
            s.run_with_ort_values(["y"], {"x": values[dt]})
    half_times: dict[str, list[float]] = {k: [] for k in half_sessions}
    for _ in range(args.rounds):
        for name, s in half_sessions.items():
            value = values[half_models[name][1]]
            start = time.perf_counter()
            s.run_with_ort_values(["y"], {"x": value})
            half_times[name].append(time.perf_counter() - start)
    half_base = half_times["Mul fp16 (reference)"]
    print(f"one rotation over [{n}, {d}] in fp16 / bf16 (computed in fp32), against a fp16 Mul, "
          f"{args.rounds} interleaved rounds")
    for name, t in half_times.items():
        ratio = statistics.median(a / b for a, b in zip(t, half_base, strict=True))
        print(f"  {name:>34}: {statistics.median(t) * 1e3:8.3f} ms   {ratio:6.2f}x a single fp16 Mul")


if __name__ == "__main__":
    main()
