"""The road ops on onnxruntime's CUDA execution provider: the CUDA kernels against the CPU kernels and torch, and a
GPU RoadSession's runs and generation against peft. Marked `gpu`; skipped where onnxruntime has no CUDA provider or
the road CUDA kernels cannot run (no driver, no NVRTC)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import peft
import pytest
import torch
from conftest import tiny
from onnx import TensorProto, helper, numpy_helper
from test_native import NP, rotation_model

import road_export as rx
from road_export.graph import native
from road_export.runtime.gpu import cuda_providers
from passes import testutil
from road_export.graph import ops as road_op
from road_export.runtime.session import RoadSession
from road_export.graph.swap import convert_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(),
                       reason="onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)"),
    pytest.mark.skipif(native.cuda_kernels() is not None, reason=f"no road CUDA kernels: {native.cuda_kernels()}"),
]
RTOL = {TensorProto.FLOAT: 1e-5, TensorProto.DOUBLE: 1e-12, TensorProto.FLOAT16: 1e-3, TensorProto.BFLOAT16: 8e-3}


def torch_rotate(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, g: int) -> torch.Tensor:
    """peft's RoAd rotation written in torch (an independent reference): y = x * c1 + rot(x) * c2, with rot mapping each
    group [x1 | x2] of the last axis to [-x2 | x1]."""
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // g, 2, g // 2)
    rotated = torch.cat([-grouped[..., 1:, :], grouped[..., :1, :]], -2).reshape(x.shape)
    return x * c1 + rotated * c2


def cuda_session(model: bytes, *, profile: str | None = None):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    assert native.register(options, True)
    return ort.InferenceSession(model, options, providers=cuda_providers())


def cpu_session(model: bytes):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    assert native.register(options, True)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


SHAPES = [  # (x shape, group size, per-row coefficients)
    ((1, 1, 2048), 64, False),   # decode: batch 1, sequence 1
    ((1, 1, 192), 64, True),     # d not a multiple of the 256-thread block
    ((3, 5, 320), 64, True),     # per-row coefficients [batch, 1, d], as a mixed-adapter graph gathers them
    ((2, 7, 24), 8, False),
    ((70000, 8), 4, False),      # more rows than one grid axis holds (65535): the kernel loops over rows
    ((2, 3, 4, 16), 2, True),    # rank 4, smallest group
]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE],
                         ids=["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("variant", ["road_1", "road_4"])
@pytest.mark.parametrize("shape,g,per_row", SHAPES, ids=[str(s[0]) for s in SHAPES])
def test_cuda_kernel_matches_cpu_kernel_and_torch(tmp_path, shape, g, per_row, variant, dtype):
    rng = np.random.default_rng(hash((shape, g, variant, dtype)) % 2**32)
    d = shape[-1]
    c1, c2 = testutil.coefficients(variant, d, g, rng)
    if per_row:
        scale = (shape[0], *[1] * (len(shape) - 1))
        c1 = (c1 * rng.normal(1, 0.3, scale)).astype(np.float32)
        c2 = (c2 * rng.normal(1, 0.3, scale)).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    io = NP.get(dtype, np.float32)
    op = road_op.TIED_OP_TYPE if variant == "road_1" else road_op.OP_TYPE
    model = rotation_model(c1, c2, g, x_rank=x.ndim, dtype=dtype, op_type=op, bodies=False)
    on_gpu = cuda_session(model, profile=str(tmp_path / "gpu"))
    got = on_gpu.run(None, {"x": x.astype(io)})[0].astype(np.float64)
    providers = {e["args"]["op_name"]: e["args"].get("provider") for e in json.load(open(on_gpu.end_profiling()))
                 if e.get("cat") == "Node"}
    assert providers[op] == "CUDAExecutionProvider"  # the CUDA kernel ran, not the CPU one
    on_cpu = cpu_session(model).run(None, {"x": x.astype(io)})[0].astype(np.float64)
    inputs = [torch.from_numpy(a.astype(io).astype(np.float32)) for a in (x, c1, c2)]
    if dtype == TensorProto.BFLOAT16:
        inputs = [a.to(torch.bfloat16).float() for a in inputs]
    reference = torch_rotate(*[a.double() for a in inputs], g).numpy()
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= RTOL[dtype] * scale
    assert np.abs(got - on_cpu).max() <= RTOL[dtype] * scale


def matmul_rotate_model(w: np.ndarray, c1: np.ndarray, c2: np.ndarray, g: int, dtype: int, rows: bool) -> bytes:
    """y = road.MatMulRotate[Rows](x, W, C1, C2[, adapter_ids]) with no function bodies: only the CUDA kernel runs it.
    bfloat16 is cast to and from float32 around the node."""
    io_type = TensorProto.FLOAT if dtype == TensorProto.BFLOAT16 else dtype
    op = road_op.MATMUL_ROWS_OP_TYPE if rows else road_op.MATMUL_OP_TYPE
    names = ["x", "w", "c1", "c2"]
    cast = [helper.make_node("Cast", [n], [n + "r"], to=dtype) for n in names]
    node_inputs = [n + "r" for n in names] + (["adapter_ids"] if rows else [])
    nodes = cast + [helper.make_node(op, node_inputs, ["yr"], domain=road_op.DOMAIN, group_size=g),
                    helper.make_node("Cast", ["yr"], ["y"], to=io_type)]
    inits = [numpy_helper.from_array(a.astype(NP[io_type]), n) for a, n in ((w, "w"), (c1, "c1"), (c2, "c2"))]
    inputs = [helper.make_tensor_value_info("x", io_type, ["b", "s", w.shape[0]])]
    if rows:
        inputs.append(helper.make_tensor_value_info("adapter_ids", TensorProto.INT64, ["b"]))
    output = helper.make_tensor_value_info("y", io_type, ["b", "s", w.shape[1]])
    graph = helper.make_graph(nodes, "mm", inputs, [output], inits)
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid(road_op.DOMAIN, road_op.VERSION)]
    proto = helper.make_model(graph, opset_imports=opsets, ir_version=11)
    return proto.SerializeToString()


MATMUL_SHAPES = [  # (batch, sequence, k, n, group size)
    (1, 1, 2048, 2048, 64),   # a decode step at batch 1
    (8, 1, 256, 704, 64),     # batch 8, n not a multiple of the kernel's 256-thread block
    (3, 17, 96, 40, 8),       # odd sizes, 51 rows
    (2, 3, 96, 40, 8),        # odd sizes, 6 rows: a partial column tile
    (2, 0, 64, 64, 64),       # no rows
]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE],
                         ids=["fp32", "fp16", "bf16", "fp64"])
@pytest.mark.parametrize("rows", [False, True], ids=["one-adapter", "per-row-banks"])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=[str(s) for s in MATMUL_SHAPES])
@pytest.mark.parametrize("path", ["auto", "cublas"])
def test_matmul_rotate_kernel_matches_torch(tmp_path, monkeypatch, shape, rows, dtype, path):
    """road.MatMulRotate against torch in float64: up to 8 rows in the one-launch GEMV kernel, more rows (or
    ROAD_EXPORT_GEMV=0) as cuBLAS's GEMM then the rotation in place; per-row banks pick each row's adapter."""
    if path == "cublas":
        monkeypatch.setenv("ROAD_EXPORT_GEMV", "0")
    batch, seq, k, n, g = shape
    rng = np.random.default_rng(batch * 1000 + n)
    io = NP.get(dtype, np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    x = rng.standard_normal((batch, seq, k)).astype(np.float32)
    banks = [testutil.coefficients("road_4", n, g, rng) for _ in range(3)]
    if rows:
        c1 = np.stack([b[0] for b in banks]).astype(np.float32)
        c2 = np.stack([b[1] for b in banks]).astype(np.float32)
        ids = rng.integers(0, 3, batch).astype(np.int64)
    else:
        c1, c2 = banks[0]
    model = matmul_rotate_model(w, c1, c2, g, dtype, rows)
    s = cuda_session(model, profile=str(tmp_path / "mm"))
    feeds = {"x": x.astype(io)}
    if rows:
        feeds["adapter_ids"] = ids
    got = s.run(None, feeds)[0].astype(np.float64)
    ran = {e["args"]["op_name"]: e["args"].get("provider") for e in json.load(open(s.end_profiling()))
           if e.get("cat") == "Node"}
    assert ran[road_op.MATMUL_ROWS_OP_TYPE if rows else road_op.MATMUL_OP_TYPE] == "CUDAExecutionProvider"

    def rounded(a):
        t = torch.from_numpy(a.astype(io).astype(np.float32))
        return (t.to(torch.bfloat16).float() if dtype == TensorProto.BFLOAT16 else t).double()

    product = rounded(x) @ rounded(w)
    r1, r2 = rounded(c1), rounded(c2)
    if rows:
        r1, r2 = r1[torch.from_numpy(ids)][:, None, :], r2[torch.from_numpy(ids)][:, None, :]
    expected = torch_rotate(product, r1, r2, g).numpy()
    assert got.shape == expected.shape
    if expected.size:
        scale = np.abs(expected).max()
        tol = {TensorProto.FLOAT: 1e-5, TensorProto.DOUBLE: 1e-12, TensorProto.FLOAT16: 2e-3,
               TensorProto.BFLOAT16: 1.6e-2}[dtype]
        assert np.abs(got - expected).max() <= tol * scale, np.abs(got - expected).max() / scale


@pytest.mark.parametrize("path", ["auto", "cublas"])
def test_matmul_rotate_rows_ids_as_gathernd_reads_them(monkeypatch, path):
    """adapter_ids as the unfused graph's GatherND reads them: negative ids count from the end, one id serves every
    row; an id outside [-banks, banks) is not read: its rows come out NaN, the others are computed, and the CUDA
    context stays usable (a later run is correct)."""
    if path == "cublas":
        monkeypatch.setenv("ROAD_EXPORT_GEMV", "0")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    c1, c2 = (np.stack(b) for b in zip(*[testutil.coefficients("road_4", 64, 8, rng) for _ in range(2)], strict=True))
    s = cuda_session(matmul_rotate_model(w, c1, c2, 8, TensorProto.FLOAT, True))
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    good = s.run(None, {"x": x, "adapter_ids": np.array([1, 0, 1], np.int64)})[0]
    assert np.isfinite(good).all()
    wrapped = s.run(None, {"x": x, "adapter_ids": np.array([-1, -2, 1], np.int64)})[0]
    np.testing.assert_array_equal(wrapped, good)
    one = s.run(None, {"x": x, "adapter_ids": np.array([1], np.int64)})[0]
    np.testing.assert_array_equal(one[[0, 2]], good[[0, 2]])
    bad = s.run(None, {"x": x, "adapter_ids": np.array([1, 7, -3], np.int64)})[0]
    assert np.isfinite(bad[0]).all() and np.isnan(bad[1]).all() and np.isnan(bad[2]).all()
    np.testing.assert_array_equal(bad[0], good[0])
    again = s.run(None, {"x": x, "adapter_ids": np.array([1, 0, 1], np.int64)})[0]
    np.testing.assert_array_equal(again, good)


def test_cuda_graph_capture_and_replay():
    """The kernel is graph safe: onnxruntime captures it (enable_cuda_graph) and each replay rotates the new contents
    of the bound input buffer."""
    rng = np.random.default_rng(0)
    c1, c2 = testutil.coefficients("road_4", 256, 64, rng)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    assert native.register(options, True)
    s = ort.InferenceSession(rotation_model(c1, c2, 64, x_rank=3, bodies=False), options,
                             providers=cuda_providers(cuda_graph=True))
    x = ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 3, 256), np.float32), "cuda", 0)
    y = ort.OrtValue.ortvalue_from_numpy(np.zeros((2, 3, 256), np.float32), "cuda", 0)
    io = s.io_binding()
    io.bind_ortvalue_input("x", x)
    io.bind_ortvalue_output("y", y)
    for _ in range(4):  # plain runs, the capture, then replays
        new = rng.standard_normal((2, 3, 256)).astype(np.float32)
        x.update_inplace(new)
        s.run_with_iobinding(io)
        expected = torch_rotate(*(torch.from_numpy(a).double() for a in (new, c1, c2)), 64).numpy()
        assert np.abs(y.numpy() - expected).max() <= 1e-5 * np.abs(expected).max()


def test_without_the_driver_no_cuda_kernel_is_registered(tmp_path):
    """ROAD_EXPORT_CUDA=0 hides the driver: the library then holds the CPU kernels only, and a model with no function
    bodies cannot run its road node on the GPU (onnxruntime places it on the CPU)."""
    c1, c2 = testutil.coefficients("road_4", 64, 64, np.random.default_rng(0))
    path = tmp_path / "road.onnx"
    path.write_bytes(rotation_model(c1, c2, 64, x_rank=2, bodies=False))
    script = ("import json,sys,onnxruntime as ort;from road_export.graph import native;"
              "from road_export.runtime.gpu import cuda_providers;o=ort.SessionOptions();o.enable_profiling=True;"
              "o.profile_file_prefix=sys.argv[2];"
              "native.register(o,True);s=ort.InferenceSession(sys.argv[1],o,providers=cuda_providers());"
              "import numpy as np;s.run(None,{'x':np.ones((2,64),np.float32)});"
              "print([e['args'].get('provider') for e in json.load(open(s.end_profiling())) "
              "if e.get('cat')=='Node' and e['args']['op_name']=='Rotate'][0])")
    for flag, provider in (("0", "CPUExecutionProvider"), ("1", "CUDAExecutionProvider")):
        env = {**os.environ, "ROAD_EXPORT_CUDA": flag}
        done = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / flag)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip().splitlines()[-1] == provider


def road_nodes(path) -> int:
    import onnx

    return sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node if n.domain == road_op.DOMAIN)


def peft_model(variant="road_4", seed=0):
    torch.manual_seed(seed)
    config = peft.RoadConfig(variant=variant, group_size=8, init_weights=False, target_modules="all-linear")
    return peft.get_peft_model(tiny("tiny-llama"), config).eval()


def prompt(vocab, batch=2, length=7, pad=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def peft_generate(model, ids, mask, new):
    defaults = model.generation_config
    saved, defaults.eos_token_id = defaults.eos_token_id, None
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                 pad_token_id=0)
    finally:
        defaults.eos_token_id = saved
    return out.numpy()


@pytest.fixture(scope="module")
def rotate_export(tmp_path_factory):
    model = peft_model()
    root = tmp_path_factory.mktemp("gpu")
    result = rx.export(model, root / "rotate.onnx", mode="rotate", task="text-generation-with-past")
    half = rx.export(model, root / "rotate16.onnx", mode="rotate", task="text-generation-with-past",
                     dtype="float16")
    return model, result.path, half.path


def test_generate_on_the_gpu_equals_peft(rotate_export):
    model, path, _ = rotate_export
    session = RoadSession(path, providers=cuda_providers())
    assert session.device == "cuda" and session.native
    assert session.fused == road_nodes(path)  # each MatMul + rotation: one node
    ids, mask = prompt(model.config.vocab_size)
    expected = peft_generate(model, ids, mask, 12)
    assert (session.generate(ids.numpy(), mask.numpy(), max_new_tokens=12) == expected).all()
    cpu = RoadSession(path)
    assert (cpu.generate(ids.numpy(), mask.numpy(), max_new_tokens=12) == expected).all()
    sampled = dict(max_new_tokens=6, do_sample=True, top_k=20, seed=5)  # sampling: host choice, same draws
    assert (session.generate(ids.numpy(), mask.numpy(), **sampled) == cpu.generate(ids.numpy(), mask.numpy(),
                                                                                   **sampled)).all()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_logits_on_the_gpu_match_torch_fp32(rotate_export, dtype):
    model, path, half = rotate_export
    providers = cuda_providers(tf32=False)  # onnxruntime's default TF32 matmuls are good for ~1e-3 only
    session = RoadSession(path if dtype == "float32" else half, providers=providers)
    bodies = RoadSession(path if dtype == "float32" else half, providers=providers, native=False)
    assert session.native and not bodies.native
    ids, mask = prompt(model.config.vocab_size, pad=0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits.numpy()
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    from road_export.runtime.generation import _empty_cache, positions

    feeds["position_ids"] = positions(feeds["attention_mask"])
    feeds.update(_empty_cache(session, 2))
    got = session.run_on_device(feeds, output_names=["logits"])["logits"].numpy().astype(np.float32)
    tol = 1e-5 if dtype == "float32" else 2e-2  # relative to the largest logit
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= tol * scale, np.abs(got - expected).max() / scale
    body = bodies.run(feeds, output_names=["logits"])["logits"].astype(np.float32)
    assert np.abs(got - body).max() <= tol * scale, np.abs(got - body).max() / scale


def test_mixed_batch_on_the_gpu_equals_peft(tmp_path):
    base = tiny("tiny-llama")
    configs = {"a": dict(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj"]),
               "b": dict(variant="road_4", group_size=8, target_modules="all-linear")}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(init_weights=False, **configs["a"]), "a")
    theirs.add_adapter("b", peft.RoadConfig(init_weights=False, **configs["b"]))
    theirs.eval()
    ours = copy.deepcopy(base)
    for name, cfg in configs.items():
        rx.get_road_model(ours, rx.RoadConfig(**cfg), name)
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "road_" in k}
    ours.load_state_dict(state, strict=False)
    result = rx.export(ours, tmp_path / "mixed.onnx", mode="rotate", task="text-generation-with-past")
    session = RoadSession(result.path, providers=cuda_providers())
    assert session.mixed and session.native and session.device == "cuda" and session.fused
    names = ["b", "__base__", "a"]
    ids, mask = prompt(base.config.vocab_size, batch=3, pad=2)
    got = session.generate(ids.numpy(), mask.numpy(), adapter_names=names, max_new_tokens=8)
    for row, name in enumerate(names):
        if name == "__base__":
            with theirs.disable_adapter():
                expected = peft_generate(theirs, ids[row:row + 1], mask[row:row + 1], 8)
        else:
            theirs.set_adapter(name)
            expected = peft_generate(theirs, ids[row:row + 1], mask[row:row + 1], 8)
        assert (got[row:row + 1] == expected).all(), name


def test_adapters_swap_on_the_gpu(tmp_path):
    models = []
    for seed, name in ((0, "first"), (1, "second")):
        torch.manual_seed(seed)
        model = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(
            init_weights=False, variant="road_2", group_size=8, target_modules="all-linear")).eval()
        model.save_pretrained(str(tmp_path / name))
        models.append(model)
    result = rx.export(rx.load_adapter(tiny("tiny-llama"), tmp_path / "first"), tmp_path / "m.onnx", mode="rotate",
                       task="text-generation-with-past")
    convert_adapter(tmp_path / "second", result.path, tmp_path / "m.second.onnx_adapter")
    session = RoadSession(result.path, providers=cuda_providers())
    assert session.adapters == ["default", "second"] and session.native and session.device == "cuda"
    assert session.fused  # the swapped coefficients are inputs of the fused nodes
    ids, mask = prompt(models[0].config.vocab_size)
    first, second = (peft_generate(m, ids, mask, 8) for m in models)
    assert (first != second).any()  # the two adapters really differ
    for adapter, expected in (("second", second), ("default", first), ("second", second)):
        assert (session.generate(ids.numpy(), mask.numpy(), adapter=adapter, max_new_tokens=8) == expected).all()
