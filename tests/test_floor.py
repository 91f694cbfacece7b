"""The serving floor runs without torch: in a fresh interpreter where torch, transformers and peft cannot be imported,
the floor's modules import, attach a peft adapter to an ONNX file, optimize it, inspect it and run it
through RoadSession, with the numbers of road_export.core.rotation (numpy)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOOR = ["road_export", "road_export.runtime.session", "road_export.runtime.generation", "road_export.runtime.seq2seq",
         "road_export.passes.pipeline",
         "road_export.graph.swap", "road_export.passes.attach", "road_export.passes.builder_graph",
         "road_export.graph.inspection", "road_export.graph.ops", "road_export.graph.files",
         "road_export.graph.adapter_files", "road_export.core.names", "road_export.graph.native"]

BLOCK_TORCH = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "peft"):
            raise ImportError(f"{name} is blocked: the serving floor must not need it")
sys.meta_path.insert(0, Block())
"""


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_floor_imports_without_torch(tmp_path):
    code = "import sys\n" + "\n".join(f"import {m}" for m in FLOOR) + textwrap.dedent("""
        heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
    """)
    done = run_python(code, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_the_check_sees_torch_when_it_is_imported(tmp_path):
    done = run_python("import sys\nimport road_export.export.op\nassert 'torch' in sys.modules\nprint('ok')", tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    done = run_python(BLOCK_TORCH + "import road_export as rx\nrx.load_adapter", tmp_path)
    # load_adapter lives in road_export.export now, whose requires_export gate meets the block first
    assert done.returncode != 0 and ("blocked" in done.stderr or "not installed" in done.stderr)


SERVE = BLOCK_TORCH + textwrap.dedent("""
    import json
    from pathlib import Path
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    from safetensors.numpy import save_file
    from road_export.core import rotation
    from road_export.passes.attach import attach
    from road_export.core.config import RoadConfig
    from road_export.graph.inspection import inspect_model
    from road_export.passes.pipeline import optimize_file
    from road_export.runtime.session import RoadSession

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "layer.weight"], ["y"], name="/layer/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])],
                              [numpy_helper.from_array(w, "layer.weight")])
    Path("base.onnx").write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)
                                  .SerializeToString())
    theta, alpha = rng.normal(0, 0.5, 16).astype(np.float32), rng.normal(1, 0.5, 16).astype(np.float32)
    Path("adapter").mkdir()
    save_file({"base_model.model.layer.road_theta": theta, "base_model.model.layer.road_alpha": alpha},
              "adapter/adapter_model.safetensors")
    RoadConfig(variant="road_2", group_size=8, target_modules=["layer"]).save_pretrained("adapter")

    x = rng.standard_normal((3, 8)).astype(np.float32)
    c1, c2 = rotation.coefficients("road_2", 8, theta, alpha)
    expected = rotation.rotate(x @ w, c1, c2, 8)
    for mode in ("rotate", "merge"):
        attach("base.onnx", ["adapter"], f"{mode}.onnx", mode=mode)
        got = RoadSession(f"{mode}.onnx", native=False).run({"x": x})["y"]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    report = optimize_file("rotate.onnx", "folded.onnx", fold=True)
    assert report.road_after == 0, report.text()
    np.testing.assert_allclose(RoadSession("folded.onnx").run({"x": x})["y"], expected, rtol=0, atol=1e-4)
    assert inspect_model("rotate.onnx").road_nodes == 1 and inspect_model("folded.onnx").road_nodes == 0
    assert "torch" not in sys.modules
    print("served")
""")


def test_attach_optimize_inspect_and_run_without_torch(tmp_path):
    done = run_python(SERVE, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("served"), done.stderr[-3000:]


def test_export_without_the_extra_is_one_clear_line(tmp_path):
    code = BLOCK_TORCH + "from road_export.app.cli import main\nraise SystemExit(main(['model.onnx']))\n"
    done = run_python(code, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'road-export[export]'" in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
