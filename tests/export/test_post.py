"""Post-export passes: each does its one thing on a small graph; chained, a RoadError comes out as raised."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from passes import testutil

from road_export.core.errors import RoadError
from road_export.export import post
from road_export.export.tasks import TaskSpec
from road_export.passes.pipeline import Pipeline


def spec(outputs: tuple[str, ...]) -> TaskSpec:
    return TaskSpec("text-generation", ("x",), outputs)


def test_output_names_and_metadata():
    model = testutil.road_model(8, 16, 8, "road_2")
    result = post.OutputNamesPass(spec(("logits",)))(model)
    assert result.modified and [v.name for v in model.graph.outputs] == ["logits"]
    assert not post.OutputNamesPass(spec(("a", "b")))(model).modified  # another count: left alone
    records = [{"name": "default", "variant": "road_2", "group_size": 8, "layers": ["l"]}]
    post.MetadataPass("rotate", "text-generation", records)(model)
    props = model.metadata_props
    assert props["road_export.mode"] == "rotate" and props["road_export.task"] == "text-generation"
    assert json.loads(props["road_export.adapters"]) == records and props["road_export.version"]


def test_axis_names_and_extra_metadata_of_a_part():
    """An encoder-decoder part's axis names (optimum's) land on the symbolic axes named, fixed sizes stay, and its
    record follows the road_export.* ones."""
    model = testutil.road_model(8, 16, 8, "road_2")  # x, y: [batch, seq, d]
    axes = {"x": {0: "batch_size", 1: "encoder_sequence_length", 2: "not a symbol"}, "y": {1: "decoder_length"}}
    plan = post.PostExportPlan("merge", None, [], optimize=False, axes=axes, metadata={"road_export.seq2seq": "{}"})
    assert [type(p).__name__ for p in post.post_export_passes(plan).passes] == ["AxisNamesPass", "MetadataPass"]
    post.post_export_passes(plan)(model)
    x, y = model.graph.inputs[0], model.graph.outputs[0]
    assert [str(d) for d in x.shape] == ["batch_size", "encoder_sequence_length", "8"]
    assert [str(d) for d in y.shape] == ["batch", "decoder_length", "16"]
    assert list(model.metadata_props)[-1] == "road_export.seq2seq"


def test_the_chain_runs_in_order_and_keeps_each_result():
    model = testutil.road_model(8, 16, 8, "road_1")
    for key in list(model.functions):
        del model.functions[key]  # the exporter emits bare road nodes
    plan = post.PostExportPlan("rotate", spec(("y",)), [], optimize=False)
    chain = post.post_export_passes(plan)
    names = [type(p).__name__ for p in chain.passes]
    assert names == ["AttachFunctionsPass", "Pipeline", "OutputNamesPass", "MetadataPass"]
    result = chain(model)
    assert [type(p).__name__ for p, _ in result.steps] == names
    assert {f.name for f in model.functions.values()} == {"RotateTied"}  # attached, then lowered for onnxruntime


def test_a_road_error_inside_the_chain_is_raised_as_is():
    model = testutil.road_model(8, 16, 8, "road_2")

    class Refuse(ir.passes.InPlacePass):
        def call(self, model):
            raise RoadError("planted: one clear line")

    with pytest.raises(RoadError, match="planted"):
        Pipeline(post.MetadataPass("merge", None, []), Refuse())(model)
