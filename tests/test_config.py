import json

import peft
import pytest

from road_export import RoadConfig, RoadError


def test_defaults_match_peft():
    ours, theirs = RoadConfig(), peft.RoadConfig()
    for field in ("variant", "group_size", "init_weights", "target_modules", "modules_to_save"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.peft_type == "ROAD" == str(theirs.peft_type.value)


@pytest.mark.parametrize("variant", ["road_3", "lora", ""])
def test_unknown_variant_names_value(variant):
    with pytest.raises(ValueError, match=repr(variant)):
        RoadConfig(variant=variant)


@pytest.mark.parametrize("group_size", [0, -2, 3, 63])
def test_bad_group_size_names_value(group_size):
    with pytest.raises(ValueError, match=str(group_size)):
        RoadConfig(group_size=group_size)


def test_list_of_targets_becomes_set():
    assert RoadConfig(target_modules=["q_proj", "v_proj", "q_proj"]).target_modules == {"q_proj", "v_proj"}
    assert RoadConfig(target_modules=".*q_proj").target_modules == ".*q_proj"


def test_json_round_trip_with_peft(tmp_path):
    ours = RoadConfig(variant="road_4", group_size=8, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(theirs, peft.RoadConfig)
    assert (theirs.variant, theirs.group_size, theirs.target_modules) == ("road_4", 8, {"q_proj"})
    assert theirs.modules_to_save == ["lm_head"]
    theirs.save_pretrained(str(tmp_path / "p"))
    back = RoadConfig.from_pretrained(tmp_path / "p")
    assert (back.variant, back.group_size, back.target_modules, back.modules_to_save) == (
        "road_4", 8, {"q_proj"}, ["lm_head"])


def test_not_road_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(RoadError, match="peft_type is 'LORA'"):
        RoadConfig.from_pretrained(tmp_path)


def test_missing_and_broken_config(tmp_path):
    with pytest.raises(RoadError, match="no such file"):
        RoadConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(RoadError, match="not a readable JSON"):
        RoadConfig.from_pretrained(tmp_path)
