"""Adapter directories: ours load in peft, peft's load in ours, live peft models are adopted."""

import copy
import json

import peft
import pytest
import torch
from conftest import first_output, tiny, token_inputs

import road_export as rx
from road_export import RoadConfig, RoadError, RoadLayer


def peft_saved(tmp_path, name="tiny-llama", **kwargs):
    torch.manual_seed(7)
    base = tiny(name)
    config = peft.RoadConfig(group_size=8, init_weights=False, **kwargs)
    model = peft.get_peft_model(base, config).eval()
    if kwargs.get("modules_to_save"):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, peft.utils.other.ModulesToSaveWrapper):
                    m.modules_to_save["default"].weight.mul_(1.5)
    model.save_pretrained(str(tmp_path / "peft"))
    return model, tmp_path / "peft"


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_peft_adapter_loads_in_ours(tmp_path, variant):
    theirs, path = peft_saved(tmp_path, variant=variant, target_modules="all-linear")
    ours = rx.load_adapter(tiny("tiny-llama"), path)
    inputs = token_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


def test_modules_to_save_travel_both_ways(tmp_path):
    theirs, path = peft_saved(tmp_path, variant="road_2", target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = rx.load_adapter(tiny("tiny-llama"), path)
    inputs = token_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)
    rx.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(tiny("tiny-llama"), str(tmp_path / "ours")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**inputs).logits, theirs(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert", "tiny-opt"])
def test_our_adapter_loads_in_peft(tmp_path, name):
    torch.manual_seed(1)
    ours = rx.get_road_model(tiny(name), RoadConfig(variant="road_4", group_size=16, init_weights=False))
    rx.save_adapter(ours, tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROAD" and saved["variant"] == "road_4"
    theirs = peft.PeftModel.from_pretrained(tiny(name), str(tmp_path / "a")).eval()
    inputs = token_inputs(ours)
    with torch.no_grad():
        torch.testing.assert_close(first_output(ours(**inputs)), first_output(theirs(**inputs)), atol=1e-5, rtol=0)


def test_from_peft_shares_tensors():
    torch.manual_seed(2)
    theirs = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                    init_weights=False)).eval()
    inputs = token_inputs(theirs)
    with torch.no_grad():
        expected = theirs(**inputs).logits
    pointers = {n: p.data_ptr() for n, p in theirs.named_parameters()}
    ours = rx.from_peft(theirs)
    assert all(isinstance(m, RoadLayer) for m in rx.road_layers(ours).values()) and rx.road_layers(ours)
    for name, p in ours.named_parameters():
        assert p.data_ptr() == pointers["base_model.model." + name], name
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).logits, expected, atol=0, rtol=0)


def write_adapter(tmp_path, **changes):
    torch.manual_seed(1)
    ours = rx.get_road_model(tiny("tiny-llama"), RoadConfig(variant="road_2", group_size=8, init_weights=False))
    path = rx.save_adapter(ours, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_bad_adapters(tmp_path):
    with pytest.raises(RoadError, match="no such adapter directory"):
        rx.load_adapter(tiny("tiny-llama"), tmp_path / "missing")
    path = write_adapter(tmp_path, peft_type="LORA")
    with pytest.raises(RoadError, match="not 'ROAD'"):
        rx.load_adapter(tiny("tiny-llama"), path)
    path = write_adapter(tmp_path, variant="road_4")
    with pytest.raises(RoadError, match=r"q_proj.road_\w+ has shape \(64,\), expected \(128,\)"):
        rx.load_adapter(tiny("tiny-llama"), path)
    path = write_adapter(tmp_path)
    with pytest.raises(RoadError, match="do not exist in this BertModel"):
        rx.load_adapter(tiny("tiny-bert"), path)


def test_truncated_safetensors(tmp_path):
    path = write_adapter(tmp_path)
    file = path / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:-40])
    with pytest.raises(RoadError, match="truncated or corrupt"):
        rx.load_adapter(tiny("tiny-llama"), path)


def test_nan_parameters_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_adapter(tmp_path)
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = sorted(tensors)[0]
    tensors[key][3] = float("nan")
    save_file(tensors, str(file))
    with pytest.raises(RoadError, match="NaN or Inf"):
        rx.load_adapter(tiny("tiny-llama"), path)


def test_failed_load_leaves_model_untouched(tmp_path):
    path = write_adapter(tmp_path, variant="road_4")
    model = tiny("tiny-llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RoadError):
        rx.load_adapter(model, path)
    assert not rx.road_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
