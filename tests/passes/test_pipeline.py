"""The pipeline on a peft RoAd model exported by plain torch.onnx.export: one road node per adapted layer,
or none with fold; parity with peft's forward kept either way."""

import logging
import warnings

import onnx
import peft
import pytest
import torch

from road_export.passes.pipeline import optimize_file
from road_export.app.verify import verify
from road_export.export.zoo import load_model


def plain_export(peft_model, path, optimize):
    ids = torch.randint(3, 200, (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    peft_model.get_base_model().config.use_cache = False  # a plain logits output, no cache object
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(peft_model.get_base_model(), (), kwargs=inputs, dynamo=True, optimize=optimize,
                                        dynamic_shapes={k: {0: "batch", 1: "sequence"} for k in inputs},
                                        verbose=False)
    finally:
        logging.disable(logging.NOTSET)
    program.save(str(path))


@pytest.fixture(scope="module", params=["road_1", "road_4"])
def peft_model(request):
    torch.manual_seed(0)
    config = peft.RoadConfig(variant=request.param, group_size=8, init_weights=False,
                             target_modules=["q_proj", "v_proj", "down_proj"])
    return peft.get_peft_model(load_model("tiny-llama"), config).eval()


@pytest.mark.parametrize("exporter_optimize", [True, False])
def test_peft_export_gets_one_road_node_per_layer(peft_model, exporter_optimize, tmp_path):
    plain_export(peft_model, tmp_path / "peft.onnx", exporter_optimize)
    report = optimize_file(tmp_path / "peft.onnx", tmp_path / "fused.onnx")
    adapted = 6  # q_proj, v_proj, down_proj in 2 layers
    assert report.step("fuse").changed == adapted and report.road_after == adapted
    graph = onnx.load(tmp_path / "fused.onnx").graph
    assert sum(n.domain == "road" for n in graph.node) == adapted
    assert report.nodes_after < report.nodes_before - adapted
    # tiny-llama: 4 query heads over 2 key/value heads; each layer's key transpose becomes one Transpose and, in
    # the optimised export (the form road-export writes: shapes recorded, the repeat as Unsqueeze/Expand/Reshape),
    # both products are regrouped; the unoptimised one spells the repeat with Slices and keeps it
    assert report.step("attention").changed == (2 * 3 if exporter_optimize else 2)
    if exporter_optimize:
        expands = [sum(n.op_type == "Expand" for n in onnx.load(tmp_path / f).graph.node) for f in ("peft.onnx",
                                                                                                    "fused.onnx")]
        assert expands[0] - expands[1] == 2 * 2, expands  # the key and value repeats of both layers
    assert verify(tmp_path / "fused.onnx", peft_model, task="causal-lm").passed

    folded = optimize_file(tmp_path / "peft.onnx", tmp_path / "folded.onnx", fold=True)
    assert folded.road_after == 0 and folded.step("fold").changed == adapted
    model = onnx.load(tmp_path / "folded.onnx")
    assert not any(n.domain == "road" for n in model.graph.node) and not model.functions
    assert verify(tmp_path / "folded.onnx", peft_model, task="causal-lm").passed


def test_lowered_export_folds_and_round_trips(tmp_path):
    import road_export as rx

    torch.manual_seed(1)
    model = rx.get_road_model(load_model("tiny-qwen2"), rx.RoadConfig(variant="road_1", group_size=8,
                                                                       init_weights=False, target_modules="all-linear"))
    rx.export(model, tmp_path / "rotate.onnx", mode="rotate")
    assert {n.op_type for n in onnx.load(tmp_path / "rotate.onnx").graph.node if n.domain == "road"} == {"RotateTied"}
    portable = optimize_file(tmp_path / "rotate.onnx", tmp_path / "portable.onnx", target="portable")
    assert portable.road_after == 14
    assert {f.name for f in onnx.load(tmp_path / "portable.onnx").functions} == {"Rotate"}
    assert verify(tmp_path / "portable.onnx", model).passed
    folded = optimize_file(tmp_path / "rotate.onnx", tmp_path / "folded.onnx", fold=True)
    assert folded.road_after == 0 and verify(tmp_path / "folded.onnx", model).passed
