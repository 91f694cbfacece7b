"""merge-checkpoint: a sharded checkpoint merged shard by shard equals the in-memory merge."""

import copy

import peft
import pytest
import torch
from conftest import first_output, tiny, token_inputs

import road_export as rx
from road_export import RoadError
from road_export.export.checkpoint import merge_checkpoint
from road_export.export.zoo import load_model


@pytest.mark.parametrize("name,dtype", [("tiny-llama", torch.float32), ("tiny-opt", torch.bfloat16),
                                        ("tiny-gpt2", torch.float32)])
def test_sharded_merge_equals_in_memory_merge(tmp_path, name, dtype):
    base = tiny(name).to(dtype)
    base.save_pretrained(tmp_path / "base", max_shard_size="100KB")
    assert len(list((tmp_path / "base").glob("*.safetensors"))) >= 2
    torch.manual_seed(0)
    tied = base.config.tie_word_embeddings  # a tied lm_head is not stored, so it cannot be a module to save
    adapted = rx.get_road_model(copy.deepcopy(base), rx.RoadConfig(variant="road_4", group_size=8,
                                init_weights=False, target_modules="all-linear",
                                modules_to_save=None if tied else ["lm_head"]))
    if not tied:
        with torch.no_grad():
            adapted.lm_head.weight.mul_(1.5)
    rx.save_adapter(adapted, tmp_path / "adapter")
    report = merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert len(report.merged) >= len(rx.road_layers(adapted))
    merged = load_model(tmp_path / "merged").to(dtype)
    reference = rx.merge_and_unload(adapted)
    inputs = token_inputs(merged)
    for key, value in reference.state_dict().items():
        atol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(merged.state_dict()[key], value, atol=atol, rtol=0, msg=key)
    with torch.no_grad():
        torch.testing.assert_close(first_output(merged(**inputs)).float(), first_output(reference(**inputs)).float(),
                                   atol=1e-4 if dtype == torch.float32 else 5e-2, rtol=0)


def test_matches_peft_merge_and_unload(tmp_path):
    base = tiny("tiny-llama")
    base.save_pretrained(tmp_path / "base", max_shard_size="200KB")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.RoadConfig(variant="road_2", group_size=8,
                                                                      init_weights=False, target_modules="all-linear"))
    theirs.save_pretrained(str(tmp_path / "adapter"))
    merge_checkpoint(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    peft_merged = theirs.merge_and_unload()
    for key, value in peft_merged.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[key], value, atol=1e-5, rtol=0, msg=key)


def test_adapter_for_another_model_is_refused(tmp_path):
    tiny("tiny-llama").save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    bert = peft.get_peft_model(tiny("tiny-bert"), peft.RoadConfig(group_size=8))
    bert.save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(RoadError, match=r"4 adapted tensor\(s\) have no place .*encoder.layer.0.attention"):
        merge_checkpoint(tmp_path / "base", tmp_path / "bert", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
