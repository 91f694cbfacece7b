"""`road-export verify MODEL --against REF.onnx`: one ONNX file against another on onnxruntime, without torch."""
# ruff: noqa: F811  (the session fixtures of test_cli are imported, then named as test arguments)

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper
from test_cli import assert_bad_input, exported, llama_dirs, road_export  # noqa: F401  (session fixtures)
from test_floor import BLOCK_TORCH, run_python

from road_export.crosscheck import verify_against_file


def _planted(path, out, name_part: str | None, row: int):
    """A copy of `path` with row `row` of the first initializer whose name holds `name_part` (None: the first
    2-D weight that is not the embedding table) moved by 0.5."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if (name_part in init.name) if name_part else (len(init.dims) == 2 and "embed" not in init.name):
            array = numpy_helper.to_array(init).copy()
            array[row] += 0.5
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            break
    else:
        raise AssertionError(f"no initializer named like {name_part}")
    onnx.save(model, str(out))
    return out


def test_rotate_against_merged_passes(exported):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    report = verify_against_file(rotated, merged)
    assert report.passed, report.table()
    assert report.reference == f"file {merged.name}" and len(report.rows) == 3
    assert report.rows[0].output == "logits" and report.rows[0].max_abs < 1e-4


def test_a_planted_fault_fails(exported, tmp_path):
    merged, _ = exported["merge"]
    weight = _planted(merged, tmp_path / "weight.onnx", None, 0)
    assert not verify_against_file(weight, merged).passed
    # token id 0 is fed in every case of 4 tokens or more: a broken embedding row of a special token is caught too
    special = _planted(merged, tmp_path / "embed.onnx", "embed_tokens", 0)
    report = verify_against_file(special, merged)
    assert not report.passed and report.rows[1].max_abs > 1e-2 and report.rows[2].max_abs > 1e-2, report.table()


def test_cli_against(exported, tmp_path):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    good = road_export("verify", rotated, "--against", merged, "--report", tmp_path / "p.json")
    assert good.returncode == 0 and "parity PASSED" in good.stdout and f"reference: file {merged.name}" in good.stdout
    assert json.loads((tmp_path / "p.json").read_text())["passed"] is True
    bad = road_export("verify", _planted(merged, tmp_path / "bad.onnx", None, 1), "--against", merged)
    assert bad.returncode == 1 and "parity FAILED" in bad.stdout


def test_cli_against_bad_input(exported, llama_dirs, tmp_path):  # noqa: F811
    merged, _ = exported["merge"]
    assert_bad_input(road_export("verify", merged, "--against", merged), says="the reference is the file being")
    assert_bad_input(road_export("verify", merged, "--against", merged, "--base", llama_dirs / "base"),
                     says="--base with --against")
    assert_bad_input(road_export("verify", merged, "--against", tmp_path / "none.onnx"), says="none.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert_bad_input(road_export("verify", merged, "--against", tmp_path / "empty.onnx"), says="empty.onnx")
    other = tmp_path / "other.onnx"  # another task: a graph whose inputs differ
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["logits"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)], ir_version=10), other)
    assert_bad_input(road_export("verify", merged, "--against", other), says="differ from")


def test_against_runs_without_torch(exported, tmp_path):
    (merged, _), (rotated, _) = exported["merge"], exported["rotate"]
    code = BLOCK_TORCH + (f"from road_export.crosscheck import verify_against_file\n"
                          f"r = verify_against_file({str(rotated)!r}, {str(merged)!r})\n"
                          "import sys\nassert 'torch' not in sys.modules\nprint(r.passed)")
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def test_vocab_from_the_embedding_table(exported):
    merged, _ = exported["merge"]
    table = next(i for i in onnx.load(str(merged), load_external_data=False).graph.initializer
                 if "embed_tokens" in i.name)
    assert np.prod(table.dims) > 0
