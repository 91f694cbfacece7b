"""RoAd layers and injection against peft: same parameters, same outputs."""

import copy

import peft
import pytest
import torch
from conftest import first_output, tiny, token_inputs

import road_export as rx
from road_export import RoadConfig, RoadError, RoadLayer

VARIANTS = ["road_1", "road_2", "road_4"]
ARCHS = {"tiny-llama": None, "tiny-bert": None, "tiny-opt": None}


def peft_pair(name, variant, targets=None, group_size=8, seed=3):
    """(peft model, our model) with identical weights and RoAd parameters."""
    base = tiny(name)
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    kwargs = dict(variant=variant, group_size=group_size, init_weights=False, target_modules=targets)
    theirs = peft.get_peft_model(base, peft.RoadConfig(**kwargs)).eval()
    rx.get_road_model(ours, RoadConfig(**kwargs))
    copy_peft_params(theirs, ours)
    return theirs, ours


def copy_peft_params(peft_model, ours):
    state = {k.removeprefix("base_model.model."): v for k, v in peft_model.state_dict().items() if "road_" in k}
    mine = {k: v for k, v in ours.state_dict().items() if "road_" in k}
    assert set(state) == set(mine) and state
    ours.load_state_dict(state, strict=False)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_outputs_as_peft(name, variant):
    theirs, ours = peft_pair(name, variant, targets="all-linear")
    inputs = token_inputs(ours, batch=2, seq=6)
    with torch.no_grad():
        expected = first_output(theirs(**inputs))
        got = first_output(ours(**inputs))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        rx.merge_adapter(ours)
        torch.testing.assert_close(first_output(ours(**inputs)), expected, atol=1e-5, rtol=0)
        rx.unmerge_adapter(ours)
        torch.testing.assert_close(first_output(ours(**inputs)), expected, atol=1e-5, rtol=0)
        plain = rx.merge_and_unload(ours)
        assert not any(isinstance(m, RoadLayer) for m in plain.modules())
        torch.testing.assert_close(first_output(plain(**inputs)), expected, atol=1e-5, rtol=0)


def test_unmerge_restores_weights():
    _, ours = peft_pair("tiny-llama", "road_4", targets="all-linear")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    rx.merge_adapter(ours)
    rx.unmerge_adapter(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-5, rtol=0)


def test_default_targets_and_all_linear():
    model = rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8))
    assert sorted({n.rsplit(".", 1)[1] for n in rx.road_layers(model)}) == ["q_proj", "v_proj"]
    model = rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8, target_modules="all-linear"))
    assert "lm_head" not in rx.road_layers(model) and len(rx.road_layers(model)) == 14
    model = rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8, target_modules=r".*\.0\..*q_proj"))
    assert list(rx.road_layers(model)) == ["model.layers.0.self_attn.q_proj"]


def test_gpt2_conv1d_is_wrapped():
    base = tiny("tiny-gpt2")
    model = rx.get_road_model(copy.deepcopy(base), RoadConfig(variant="road_2", group_size=8, init_weights=False))
    layers = rx.road_layers(model)
    assert list(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert layers["transformer.h.0.attn.c_attn"].out_features == 192
    inputs = token_inputs(model)
    with torch.no_grad():
        adapted = model(**inputs).logits
        # reference: rotate c_attn's output by hand with the dense matrix
        hooks = []
        for name, layer in layers.items():
            R = rx.core.rotation.dense_matrix(*layer.coefficients("default"), 8)
            hooks.append(base.get_submodule(name).register_forward_hook(lambda m, i, o, R=R: o @ R.T))
        torch.testing.assert_close(adapted, base(**inputs).logits, atol=1e-5, rtol=0)
        for h in hooks:
            h.remove()
        merged = rx.merge_and_unload(model)
        torch.testing.assert_close(merged(**inputs).logits, adapted, atol=1e-5, rtol=0)


def two_adapters(targets_b):
    """tiny-llama with adapter "a" (road_1, g 8, default targets) and "b" (road_4, g 16, `targets_b`)."""
    model = tiny("tiny-llama")
    torch.manual_seed(0)
    rx.get_road_model(model, RoadConfig(variant="road_1", group_size=8, init_weights=False), "a")
    rx.get_road_model(model, RoadConfig(variant="road_4", group_size=16, init_weights=False,
                                        target_modules=targets_b), "b")
    return model


def test_mixed_batch_rows_equal_single_adapter_runs():
    model = two_adapters(["o_proj", "v_proj"])
    inputs = token_inputs(model, batch=3)
    names = ["b", "__base__", "a"]
    with torch.no_grad():
        with rx.mixed_batch(model, names):
            mixed = model(**inputs).logits
        for row, name in enumerate(names):
            if name == "__base__":
                with rx.disable_adapters(model):
                    single = model(**inputs).logits
            else:
                rx.set_adapter(model, name)
                single = model(**inputs).logits
            torch.testing.assert_close(mixed[row], single[row], atol=1e-5, rtol=0)
    with pytest.raises(RoadError, match="non-existing adapter"):
        with rx.mixed_batch(model, ["a", "c", "a"]):
            pass


def test_mixed_batch_matches_peft():
    base = tiny("tiny-opt")
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base, peft.RoadConfig(variant="road_2", group_size=8, init_weights=False))
    theirs.add_adapter("other", peft.RoadConfig(variant="road_1", group_size=16, init_weights=False))
    theirs.eval()
    rx.get_road_model(ours, RoadConfig(variant="road_2", group_size=8))
    rx.get_road_model(ours, RoadConfig(variant="road_1", group_size=16), "other")
    copy_peft_params(theirs, ours)
    inputs = token_inputs(ours, batch=3)
    names = ["other", "default", "__base__"]
    with torch.no_grad():
        expected = theirs(**inputs, adapter_names=names).logits
        with rx.mixed_batch(ours, names):
            torch.testing.assert_close(ours(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_bad_group_size_names_module():
    with pytest.raises(RoadError, match=r"model.layers.0.self_attn.v_proj: out_features 32 .* group_size 64"):
        rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=64, target_modules=["v_proj"]))


def test_targets_matching_nothing():
    with pytest.raises(RoadError, match="match no module"):
        rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8, target_modules=["query", "value"]))


def test_target_that_is_not_linear():
    with pytest.raises(RoadError, match="only wraps"):
        rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8, target_modules=["mlp"]))


def test_duplicate_and_reserved_adapter_names():
    model = rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8))
    with pytest.raises(RoadError, match="already exists"):
        rx.get_road_model(model, RoadConfig(group_size=8))
    with pytest.raises(RoadError, match="reserved"):
        rx.get_road_model(model, RoadConfig(group_size=8), "__base__")


def test_adapter_ids_equal_named_mixed_batch():
    model = two_adapters(["q_proj", "o_proj"])
    inputs = token_inputs(model, batch=4)
    with torch.no_grad():
        with rx.mixed_batch(model, ["b", "__base__", "a", "b"]):
            named = model(**inputs).logits
        with rx.adapter_ids(model, [2, 0, 1, 2], order=["a", "b"]):
            by_id = model(**inputs).logits
    torch.testing.assert_close(by_id, named, atol=1e-5, rtol=0)


def test_second_all_linear_adapter_does_not_nest_layers():
    model = rx.get_road_model(tiny("tiny-llama"), RoadConfig(group_size=8, target_modules=["q_proj"]), "a")
    rx.get_road_model(model, RoadConfig(group_size=8, target_modules="all-linear"), "b")
    layers = rx.road_layers(model)
    assert len(layers) == 14 and not any(isinstance(layer.base_layer, RoadLayer) for layer in layers.values())
    assert set(layers["model.layers.0.self_attn.q_proj"].adapters) == {"a", "b"}
