"""One graph, many adapters: every row equals its adapter's single-adapter torch and peft output."""

import copy

import numpy as np
import peft
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export import RoadConfig, RoadError
from road_export.runtime.session import RoadSession

ADAPTERS = {
    "a": dict(variant="road_1", group_size=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(variant="road_4", group_size=16, target_modules=["q_proj", "o_proj", "down_proj"]),
    "c": dict(variant="road_2", group_size=8, target_modules="all-linear"),
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    base = tiny("tiny-llama")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(init_weights=False, **ADAPTERS["a"]), "a")
    for name in ("b", "c"):
        theirs.add_adapter(name, peft.RoadConfig(init_weights=False, **ADAPTERS[name]))
    theirs.eval()
    ours = copy.deepcopy(base)
    for name, cfg in ADAPTERS.items():
        rx.get_road_model(ours, RoadConfig(**cfg), name)
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "road_" in k}
    ours.load_state_dict(state, strict=False)
    path = tmp_path_factory.mktemp("mixed") / "mixed.onnx"
    result = rx.export(ours, path, mode="rotate")
    return ours, theirs, result


@pytest.mark.parametrize("native", [True, False], ids=["native", "bodies"])
def test_every_row_equals_its_single_adapter_run(mixed, native):
    ours, theirs, result = mixed
    assert result.input_names == ["input_ids", "attention_mask", "adapter_ids"]
    session = RoadSession(result.path, native=native)
    assert session.adapters == ["a", "b", "c"] and session.mixed and session.native is native
    names = ["c", "__base__", "a", "b", "a", "__base__"]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 256, (len(names), 9), generator=gen)
    mask = torch.ones_like(ids)
    got = session.run({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, adapter_names=names)["logits"]
    with torch.no_grad():
        for row, name in enumerate(names):
            if name == "__base__":
                with rx.disable_adapters(ours):
                    single = ours(input_ids=ids[row:row + 1]).logits
                with theirs.disable_adapter():
                    peft_single = theirs(input_ids=ids[row:row + 1]).logits
            else:
                rx.set_adapter(ours, name)
                single = ours(input_ids=ids[row:row + 1]).logits
                theirs.set_adapter(name)
                peft_single = theirs(input_ids=ids[row:row + 1]).logits
            np.testing.assert_allclose(got[row], single[0].numpy(), atol=1e-4, rtol=0, err_msg=name)
            np.testing.assert_allclose(got[row], peft_single[0].numpy(), atol=1e-4, rtol=0, err_msg=name)
    one = session.run({"input_ids": ids[:2].numpy(), "attention_mask": mask[:2].numpy()}, adapter="b")["logits"]
    rx.set_adapter(ours, "b")
    with torch.no_grad():
        np.testing.assert_allclose(one, ours(input_ids=ids[:2]).logits.numpy(), atol=1e-4, rtol=0)


def test_layers_with_two_group_sizes_get_two_nodes(mixed):
    ours, _, result = mixed
    layers = rx.road_layers(ours)
    expected = sum(len({layer.group_size[a] for a in layer.adapters}) for layer in layers.values())
    assert result.road_nodes == expected > len(layers)


def test_session_refuses_unknown_adapters(mixed):
    _, _, result = mixed
    session = RoadSession(result.path)
    ids = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(RoadError, match="no adapter d"):
        session.run({"input_ids": ids, "attention_mask": ids}, adapter_names=["a", "d"])
    with pytest.raises(RoadError, match="choose one with adapter="):
        session.run({"input_ids": ids, "attention_mask": ids})


def test_merge_mode_refuses_several_adapters(mixed, tmp_path):
    ours, _, _ = mixed
    with pytest.raises(RoadError, match="merge mode takes one adapter"):
        rx.export(ours, tmp_path / "m.onnx", mode="merge")
    assert not (tmp_path / "m.onnx").exists()
