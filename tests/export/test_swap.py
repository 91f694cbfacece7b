"""Adapters swapped at run time through onnxruntime's adapter API, with no reload."""

import copy

import numpy as np
import peft
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export import RoadError
from road_export.runtime.session import RoadSession
from road_export.graph.swap import convert_adapter


def peft_adapter(path, seed, **kwargs):
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(init_weights=False, **kwargs)).eval()
    model.save_pretrained(str(path))
    return rx.load_adapter(tiny("tiny-llama"), path)  # the torch reference for this adapter


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.numpy()


@pytest.mark.parametrize("native", [True, False], ids=["native", "bodies"])
@pytest.mark.parametrize("variant", ["road_2", "road_1"])
def test_swap_in_and_back(tmp_path, variant, native):
    first = peft_adapter(tmp_path / "first", 0, variant=variant, group_size=8)
    second = peft_adapter(tmp_path / "second", 1, variant=variant, group_size=8)
    result = rx.export(first, tmp_path / "m.onnx", mode="rotate")
    assert [p.name for p in result.adapter_files] == ["m.default.onnx_adapter"]
    convert_adapter(tmp_path / "second", result.path, tmp_path / "m.second.onnx_adapter")
    session = RoadSession(result.path, native=native)
    assert session.adapters == ["default", "second"] and session.native is native
    ids = np.random.default_rng(0).integers(3, 256, (2, 6))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    np.testing.assert_allclose(session.run(feeds)["logits"], logits(first, ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(session.run(feeds, adapter="second")["logits"], logits(second, ids), atol=1e-4, rtol=0)
    np.testing.assert_allclose(session.run(feeds, adapter="default")["logits"], logits(first, ids), atol=1e-4, rtol=0)
    assert np.abs(logits(first, ids) - logits(second, ids)).max() > 1e-2  # the two really differ


def test_mismatched_adapters_are_refused(tmp_path):
    first = peft_adapter(tmp_path / "first", 0, variant="road_1", group_size=8)
    result = rx.export(first, tmp_path / "m.onnx", mode="rotate")
    out = tmp_path / "x.onnx_adapter"
    peft_adapter(tmp_path / "targets", 1, variant="road_1", group_size=8, target_modules=["q_proj"])
    with pytest.raises(RoadError, match="adapted layers differ; not in the adapter: model.layers.0.self_attn.v_proj"):
        convert_adapter(tmp_path / "targets", result.path, out)
    peft_adapter(tmp_path / "group", 1, variant="road_1", group_size=16)
    with pytest.raises(RoadError, match="group_size 16 does not fit"):
        convert_adapter(tmp_path / "group", result.path, out)
    peft_adapter(tmp_path / "variant", 1, variant="road_4", group_size=8)
    with pytest.raises(RoadError, match="lowered for road_1"):
        convert_adapter(tmp_path / "variant", result.path, out)
    assert not out.exists()
    portable = rx.export(first, tmp_path / "p.onnx", mode="rotate", target="portable")
    convert_adapter(tmp_path / "variant", portable.path, tmp_path / "p.variant.onnx_adapter")
    session = RoadSession(portable.path)
    ids = np.random.default_rng(1).integers(3, 256, (1, 4))
    reference = rx.load_adapter(tiny("tiny-llama"), tmp_path / "variant")
    got = session.run({"input_ids": ids, "attention_mask": np.ones_like(ids)}, adapter="variant")["logits"]
    np.testing.assert_allclose(got, logits(reference, ids), atol=1e-4, rtol=0)


def test_merged_and_mixed_exports_are_not_swappable(tmp_path):
    first = peft_adapter(tmp_path / "first", 0, variant="road_2", group_size=8)
    merged = rx.export(copy.deepcopy(first), tmp_path / "merged.onnx")
    assert merged.adapter_files == []
    with pytest.raises(RoadError, match="not a swappable"):
        convert_adapter(tmp_path / "first", merged.path, tmp_path / "y.onnx_adapter")


def test_fixed_coefficients_are_constants(tmp_path):
    import onnx

    first = peft_adapter(tmp_path / "first", 0, variant="road_1", group_size=8)
    result = rx.export(first, tmp_path / "f.onnx", mode="rotate", swappable=False)
    proto = onnx.load(result.path)
    initializers = {t.name for t in proto.graph.initializer}
    assert result.adapter_files == [] and not [i for i in proto.graph.input if i.name in initializers]
    assert {n.op_type for n in proto.graph.node if n.domain == "road"} == {"RotateTied"}
    with pytest.raises(RoadError, match="not a swappable"):
        convert_adapter(tmp_path / "first", result.path, tmp_path / "z.onnx_adapter")
