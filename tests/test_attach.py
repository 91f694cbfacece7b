"""attach: a peft adapter placed on a plainly exported base ONNX model, in both modes, no torch export."""

import logging
import warnings

import onnx
import peft
import pytest
import torch
from conftest import tiny

from road_export import RoadError
from road_export.passes.attach import attach
from road_export.export.tasks import TaskModule, sample_inputs, task_spec
from road_export.app.verify import verify


def plain_export(name, path, dynamo):
    """The base model exported by torch.onnx.export itself (dynamo, or the legacy exporter optimum used)."""
    base = tiny(name)
    spec = task_spec(base, "causal-lm")
    inputs = sample_inputs(base, spec)
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if dynamo:
                torch.onnx.export(TaskModule(base, spec), (), kwargs=inputs, dynamo=True, verbose=False,
                                  dynamic_shapes={k: {0: "batch", 1: "sequence"} for k in inputs}).save(str(path))
            else:
                axes = {"input_ids": {0: "b", 1: "s"}, "attention_mask": {0: "b", 1: "s"}, "logits": {0: "b", 1: "s"}}
                torch.onnx.export(TaskModule(base, spec), (inputs["input_ids"], inputs["attention_mask"]), str(path),
                                  dynamo=False, input_names=list(inputs), output_names=["logits"],
                                  dynamic_axes=axes)
    finally:
        logging.disable(logging.NOTSET)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach")
    out = {}
    for name, dynamo in (("tiny-llama", True), ("tiny-opt", False)):
        plain_export(name, root / f"{name}.onnx", dynamo)
        torch.manual_seed(0)
        theirs = peft.get_peft_model(tiny(name), peft.RoadConfig(variant="road_4", group_size=8, init_weights=False,
                                                                 target_modules="all-linear")).eval()
        theirs.save_pretrained(str(root / f"{name}-adapter"))
        out[name] = (root / f"{name}.onnx", root / f"{name}-adapter", theirs)
    return out


@pytest.mark.parametrize("mode", ["rotate", "merge"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-opt"])
def test_attach_matches_peft(bases, tmp_path, name, mode):
    base, adapter, theirs = bases[name]
    report = attach(base, [adapter], tmp_path / "out.onnx", mode=mode)
    layers = 14 if name == "tiny-llama" else 12
    assert len(report.placed) == layers
    road = [n for n in onnx.load(tmp_path / "out.onnx").graph.node if n.domain == "road"]
    assert len(road) == (layers if mode == "rotate" else 0)
    assert verify(tmp_path / "out.onnx", theirs, task="causal-lm").passed


def test_adapter_for_another_model_lists_unplaced_modules(bases, tmp_path):
    base, _, _ = bases["tiny-llama"]
    torch.manual_seed(0)
    peft.get_peft_model(tiny("tiny-bert"), peft.RoadConfig(group_size=8)).save_pretrained(str(tmp_path / "bert"))
    with pytest.raises(RoadError, match=r"cannot place 4 of 4 .*encoder.layer.0.attention.self.query \(no MatMul"):
        attach(base, [tmp_path / "bert"], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_external_data(bases, plain_llama, tmp_path):
    base, adapter, theirs = bases["tiny-llama"]
    attach(plain_llama(external_data=True), [adapter], tmp_path / "out.onnx", mode="rotate")
    assert (tmp_path / "out.onnx.data").is_file()
    assert verify(tmp_path / "out.onnx", theirs, task="causal-lm").passed
