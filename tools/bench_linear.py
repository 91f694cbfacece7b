"""The fused product + rotation kernels against onnxruntime's own products on the GPU, per projection shape.

For each projection of a Llama with TinyLlama-1.1B widths (packed qkv 2048 -> 2560, o 2048 -> 2048, gate/up
2048 -> 5632, down 5632 -> 2048) at 1 and 8 rows, fp16 and int4 (MatMulNBits, symmetric, block 32): a graph of
R = 22 such products of one input (one per layer, R weights, so that nothing stays in L2 between them), run with
onnxruntime's CUDA graphs (`enable_cuda_graph`, IOBinding), timed interleaved (tools/benchlib.py):

    base       MatMul (or MatMulNBits) alone: what onnxruntime-genai's model builder graph runs
    unfused    the product, then road.Rotate on the road CUDA kernel (two launches)
    fused      road.LinearRotate / road.MatMulNBitsRotate (passes/linear_rotate.py): one launch, the kernel the
               default picks (the tensor-core form where it fits, else the block form)
    mma1/2/4   the tensor-core form with 1, 2 or 4 tiles of 8 pairs a block (ROAD_EXPORT_MMA_TM)
    mma16      the tensor-core form, one tile a block, 16 warps splitting k (ROAD_EXPORT_MMA_WARPS=16)
    tile       the block form (ROAD_EXPORT_LINEAR=tile)
    warp       the warp-per-pair form (ROAD_EXPORT_LINEAR=warp)

and prints each / base, the figures the model-level benchmark (tools/bench_builder.py) adds up.

    python tools/bench_linear.py [--rounds 30] [--inner 20] [--forms fused,mma16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchlib import interleave  # noqa: E402

SHAPES = {"qkv": (2048, 2560), "o": (2048, 2048), "gate/up": (2048, 5632), "down": (5632, 2048)}
R = 22
G = 64


def graph(kind: str, precision: str, k: int, n: int, seed: int = 0) -> bytes:
    """R products of x [rows, 1, k], each with its own weight, as graph outputs y0..y{R-1} (rows symbolic)."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper
    from passes import testutil
    from passes.test_linear_rotate import quantize_blocks

    from road_export.graph import ops as road_op
    from road_export.passes.linear_rotate import LinearRotatePass

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    for i in range(R):
        w = rng.standard_normal((k, n), dtype=np.float32) / np.float32(np.sqrt(k))
        if precision == "int4":
            q, scales, _ = quantize_blocks(w, 4)
            inits += [numpy_helper.from_array(q, f"B{i}"), numpy_helper.from_array(scales.astype(np.float16), f"s{i}")]
            nodes.append(helper.make_node("MatMulNBits", ["x", f"B{i}", f"s{i}"], [f"h{i}"], domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=32))
        else:
            inits.append(numpy_helper.from_array(w.astype(np.float16), f"w{i}"))
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"h{i}"]))
        if kind == "base":
            nodes[-1].output[0] = f"y{i}"
            continue
        c1, c2 = testutil.coefficients("road_4", n, G, rng)
        inits += [numpy_helper.from_array(c1.astype(np.float16), f"c1_{i}"),
                  numpy_helper.from_array(c2.astype(np.float16), f"c2_{i}")]
        nodes.append(helper.make_node(road_op.OP_TYPE, [f"h{i}", f"c1_{i}", f"c2_{i}"], [f"y{i}"],
                                      domain=road_op.DOMAIN, group_size=G))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT16, ["rows", 1, n]) for i in range(R)]
    g = helper.make_graph(nodes, "bench", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["rows", 1, k])],
                          outputs, inits)
    proto = helper.make_model(g, ir_version=10, opset_imports=[
        helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)])
    model = ir.serde.deserialize_model(proto)
    if kind == "fused":
        fused = LinearRotatePass()(model)
        assert fused.linear + fused.nbits == R, fused
    road_op.attach_functions(model)
    return ir.serde.serialize_model(model).SerializeToString()


class Bound:
    """A CUDA-graph session with its input and outputs bound to fixed GPU buffers (`form`: ROAD_EXPORT_LINEAR for
    its kernels, read when the session creates them)."""

    def __init__(self, model: bytes, rows: int, k: int, n: int, form: str = ""):
        import os

        import onnxruntime as ort

        from road_export.graph import native
        from road_export.runtime.gpu import cuda_providers

        options = ort.SessionOptions()
        options.log_severity_level = 3
        assert native.register(options, True)
        env = ({"ROAD_EXPORT_LINEAR": "mma", "ROAD_EXPORT_MMA_WARPS": "16"} if form == "mma16" else
               {"ROAD_EXPORT_LINEAR": "mma", "ROAD_EXPORT_MMA_TM": form[3:]} if form.startswith("mma") else
               {"ROAD_EXPORT_LINEAR": form} if form else {})
        os.environ.update(env)  # read when the kernels are created and launched: kept until the graph is captured
        self.session = ort.InferenceSession(model, options, providers=cuda_providers(cuda_graph=True))
        x = np.random.default_rng(1).standard_normal((rows, 1, k)).astype(np.float16)
        self.x = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
        self.io = self.session.io_binding()
        self.io.bind_ortvalue_input("x", self.x)
        self.outs = [ort.OrtValue.ortvalue_from_shape_and_type((rows, 1, n), np.float16, "cuda", 0) for _ in range(R)]
        for i, out in enumerate(self.outs):
            self.io.bind_ortvalue_output(f"y{i}", out)
        for _ in range(3):  # plain run, capture, replay
            self.call()
        for name in env:
            os.environ.pop(name)

    def call(self) -> None:
        self.session.run_with_iobinding(self.io)
        self.io.synchronize_outputs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--forms", default="fused,mma1,mma2,mma4,mma16,tile,warp,unfused",
                        help="comma-separated, of: fused, mma1, mma2, mma4, mma16, tile, warp, unfused")
    args = parser.parse_args()
    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; R = {R} products a run, CUDA graphs, medians of paired ratios")
    forms = tuple(args.forms.split(","))
    print(f"{'precision':>9} {'proj':>8} {'rows':>4} {'base us':>8} " + " ".join(f"{f + '/base':>12}" for f in forms))
    for precision in ("fp16", "int4"):
        for proj, (k, n) in SHAPES.items():
            models = {kind: graph(kind, precision, k, n) for kind in ("base", "fused", "unfused")}
            for rows in (1, 8):
                base = Bound(models["base"], rows, k, n)
                ratios, base_us = [], []
                for form in forms:
                    other = Bound(models["unfused" if form == "unfused" else "fused"], rows, k, n,
                                  form="" if form in ("fused", "unfused") else form)
                    pair = interleave(other.call, base.call, rounds=args.rounds, inner=args.inner,
                                      names=(form, "base"))
                    ratios.append(pair.ratio)
                    base_us.append(pair.median_b / R * 1e6)
                    del other
                print(f"{precision:>9} {proj:>8} {rows:>4} {np.median(base_us):8.2f} "
                      + " ".join(f"{r:12.3f}" for r in ratios), flush=True)


if __name__ == "__main__":
    main()
