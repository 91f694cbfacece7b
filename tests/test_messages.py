"""What the commands say: the quantization on every "wrote" line and in inspect, bad block sizes refused, --atol on
a quantized file, attach onto bases quantized by other tools, adapter --like on a model that takes no swap file."""

from __future__ import annotations

import onnx
import peft
import pytest
import torch
from conftest import copy_onnx, tiny
from onnx import TensorProto, helper
from test_cli import assert_bad_input, road_export

from road_export.graph import quantize
from road_export.core.errors import RoadError


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, plain_llama):
    """A tiny Llama base directory, a peft RoAd adapter, the base's export without adapter, its int4 export."""
    root = tmp_path_factory.mktemp("quantize_messages")
    tiny("tiny-llama").save_pretrained(root / "base")
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_2", group_size=8, init_weights=False))
    pm.save_pretrained(str(root / "road"))
    copy_onnx(plain_llama(), root)  # plain.onnx: tiny-llama exported without adapter
    return root


def test_every_command_says_how_it_quantized(dirs, tmp_path):
    src = ["--base", dirs / "base", "--adapter", dirs / "road"]
    proc = road_export(*src, "--mode", "rotate", "--quantize", "int4", "--no-verify", tmp_path / "q.onnx")
    assert proc.returncode == 0, proc.stderr
    wrote = proc.stderr.strip().splitlines()[-1]
    assert "float32, int4 (MatMulNBits, blocks of 16;" in wrote, wrote
    total = sum(n.op_type == "MatMulNBits" for n in onnx.load(tmp_path / "q.onnx").graph.node)
    assert f"{total} of {total} MatMul weights" in wrote, wrote
    proc = road_export("inspect", tmp_path / "q.onnx")
    assert "  quantized: int4 (MatMulNBits, blocks of 16;" in proc.stdout, proc.stdout
    assert "int8 in blocks of 32" in proc.stdout and "the output head" in proc.stdout, proc.stdout
    proc = road_export("optimize", dirs / "plain.onnx", tmp_path / "o.onnx", "--quantize", "int8")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'o.onnx'} (quantized: int8 (MatMulNBits, blocks of 32;" in proc.stdout, proc.stdout
    proc = road_export("attach", dirs / "plain.onnx", "--adapter", dirs / "road", "--quantize", "int4",
                       tmp_path / "a.onnx")
    assert proc.returncode == 0, proc.stderr
    assert "; weights int4 (MatMulNBits, blocks of 16;" in proc.stdout, proc.stdout
    assert "quantized" not in road_export("inspect", dirs / "plain.onnx").stdout


def _matmul_model():
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], [0.01 * i for i in range(64 * 64)])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    import onnx_ir as ir

    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


@pytest.mark.parametrize("block_size", [7, 8, 512, 48, 0])
def test_bad_block_size_is_refused(block_size):
    with pytest.raises(RoadError, match="block_size .*16 to 256 .*power of two"):
        quantize.quantize_model(_matmul_model(), "int4", block_size=block_size)


def test_good_block_size(tmp_path):
    _, report = quantize.quantize_model(_matmul_model(), "int4", block_size=64)
    assert report.block_size == 64 and report.quantized == 1


def test_inspect_says_a_folded_rotate_file_is_folded(dirs, tmp_path):
    rotate, folded = tmp_path / "r.onnx", tmp_path / "f.onnx"
    assert road_export("--base", dirs / "base", "--adapter", dirs / "road", "--mode", "rotate", "--no-verify",
                       rotate).returncode == 0
    assert "mode:      rotate\n" in road_export("inspect", rotate).stdout
    assert road_export("optimize", rotate, folded, "--fold").returncode == 0
    proc = road_export("inspect", folded)
    assert "mode:      rotate, folded: no road nodes left" in proc.stdout, proc.stdout


def test_atol_on_a_quantized_file_is_refused(dirs, tmp_path):
    src = ["--base", dirs / "base", "--adapter", dirs / "road"]
    assert_bad_input(road_export(*src, "--quantize", "int4", "--atol", "1e-2", tmp_path / "x.onnx"),
                     says="--atol 0.01: ", dirs=[tmp_path])
    assert not (tmp_path / "x.onnx").exists()
    q = tmp_path / "q.onnx"
    assert road_export(*src, "--quantize", "int8", "--no-verify", q).returncode == 0
    assert_bad_input(road_export("verify", q, *src, "--atol", "1e-3"),
                     says="is quantized (int8), and a quantized file's parity is judged by cosine", dirs=[tmp_path])


def test_model_directory_export_quantizes(dirs, tmp_path):
    out = tmp_path / "d"
    proc = road_export("--base", dirs / "base", "--adapter", dirs / "road", "--mode", "rotate", "--quantize", "int8",
                       "--no-verify", out)
    assert proc.returncode == 0, proc.stderr
    assert "int8 (MatMulNBits, blocks of 32;" in proc.stderr, proc.stderr
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(out / "onnx" / "model.onnx").graph.node)


def test_no_room_for_the_float_intermediate_names_the_output(dirs, tmp_path, monkeypatch):
    import errno

    from road_export.export import exporter

    real = exporter.save_model

    def full(model, path, *args, **kwargs):
        if path.parent.name.endswith(".float"):
            raise RoadError(f"{path}: cannot write (No space left on device)") from OSError(
                errno.ENOSPC, "No space left on device")
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(exporter, "save_model", full)
    out = tmp_path / "x.onnx"
    proc = road_export("--base", dirs / "base", "--adapter", dirs / "road", "--quantize", "int4", "--no-verify", out)
    assert_bad_input(proc, says=f"{out}: cannot write the float intermediate that --quantize reads", dirs=[tmp_path])
    assert "needs free space next to the output for the float model (about " in proc.stderr, proc.stderr
    assert ".float" not in proc.stderr and not out.exists()


def test_attach_onto_bases_quantized_by_onnxruntime_tools(dirs, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    out = tmp_path / "out.onnx"
    dynamic = tmp_path / "dynamic.onnx"  # MatMulInteger, the module paths dropped
    quantize_dynamic(str(dirs / "plain.onnx"), str(dynamic), op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)
    assert_bad_input(road_export("attach", dynamic, "--adapter", dirs / "road", out),
                     says="the base is quantized as MatMulInteger", dirs=[tmp_path])
    proc = road_export("attach", dynamic, "--adapter", dirs / "road", out)
    assert "and 4 of 4 adapted module(s) sit on such MatMuls" in proc.stderr, proc.stderr  # q, v of 2 layers
    nbits = tmp_path / "nbits.onnx"  # onnxruntime's own MatMulNBits quantizer: no module paths on its nodes
    quantizer = MatMulNBitsQuantizer(onnx.load(dirs / "plain.onnx"), block_size=32, is_symmetric=False)
    quantizer.process()
    quantizer.model.save_model_to_file(str(nbits))
    assert_bad_input(road_export("attach", nbits, "--adapter", dirs / "road", out),
                     says="cannot place 4 of 4 adapted module(s): the base's MatMuls are quantized (", dirs=[tmp_path])
    proc = road_export("attach", nbits, "--adapter", dirs / "road", out)
    assert "MatMulNBits) by another tool" in proc.stderr and "no MatMul/Gemm found" not in proc.stderr
    assert not out.exists()


def test_attach_names_peft_saved_base_weight_of_a_tied_head(dirs, tmp_path):
    torch.manual_seed(0)
    pm = peft.get_peft_model(tiny("tiny-qwen2"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                 target_modules=["q_proj", "lm_head"]))
    pm.save_pretrained(str(tmp_path / "tied"))
    proc = road_export("attach", dirs / "plain.onnx", "--adapter", tmp_path / "tied", tmp_path / "out.onnx")
    assert_bad_input(proc, says="carries the base weight of lm_head (lm_head.base_layer.weight), which peft saves "
                     "for an adapted layer tied to the input embeddings", dirs=[tmp_path])
    assert "modules_to_save" not in proc.stderr


def test_adapter_like_an_attach_output_says_why_it_takes_no_swap_file(dirs, tmp_path):
    attached = tmp_path / "att.onnx"
    assert road_export("attach", dirs / "plain.onnx", "--adapter", dirs / "road", attached).returncode == 0
    assert_bad_input(road_export("adapter", dirs / "road", "--like", attached, tmp_path / "x.onnx_adapter"),
                     says="road nodes hold fixed coefficients (written by road-export attach, or export --fixed)",
                     dirs=[tmp_path])
    merged = tmp_path / "m.onnx"
    assert road_export("attach", dirs / "plain.onnx", "--adapter", dirs / "road", "--mode", "merge",
                       merged).returncode == 0
    assert_bad_input(road_export("adapter", dirs / "road", "--like", merged, tmp_path / "x.onnx_adapter"),
                     says="its adapter is merged into the weights", dirs=[tmp_path])


def test_export_the_base_alone_for_attach(dirs, tmp_path):
    base = tmp_path / "base-int4.onnx"
    proc = road_export("--base", dirs / "base", "--no-adapter", "--quantize", "int4", base)
    assert proc.returncode == 0 and "parity PASSED" in proc.stdout, proc.stderr + proc.stdout
    assert "the base alone, no adapter" in proc.stderr, proc.stderr
    assert road_export("inspect", base, "--json").stdout.count('"adapters": []') == 1
    proc = road_export("attach", base, "--adapter", dirs / "road", tmp_path / "road-int4.onnx")
    assert proc.returncode == 0 and "4 module(s) placed, 4 road nodes; weights int4" in proc.stdout, proc.stderr
    assert_bad_input(road_export("--base", dirs / "base", "--no-adapter", "--adapter", dirs / "road",
                                 tmp_path / "x.onnx"), says="--no-adapter with --adapter", dirs=[tmp_path])
    assert_bad_input(road_export("--base", dirs / "base", "--no-adapter", "--mode", "rotate", tmp_path / "x.onnx"),
                     says="--no-adapter with --mode rotate", dirs=[tmp_path])


def test_bench_scale_notes_the_interpreter_on_a_small_model():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    over = [{"verdict": "OVER"}, {"verdict": "ok"}]
    note = bench.interpreter_note(int(0.2e9), over)  # --preset small: S ~ 0.2 GB
    assert note and "the interpreter alone" in note and "2.00 x S" in note
    assert bench.interpreter_note(int(13.5e9), over) is None  # 7b: the goals mean what they say
    assert bench.interpreter_note(int(0.2e9), [{"verdict": "ok"}]) is None
