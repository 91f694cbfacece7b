"""prepare.ExportContext: the export's state for the trace lives in the context and its stand-in layers, never on
the model's RoadLayers; what is traced computes what peft's model computes. No tracing here: eager calls only."""

import peft
import pytest
import torch
from conftest import tiny, token_inputs

import road_export as rx
from road_export.export import op as torch_op
from road_export.export import prepare

CONFIG = dict(variant="road_2", group_size=8, init_weights=False, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize("order", [(), ("default", "other")])
def test_rotate_context_stands_in_for_the_layers_and_computes_what_peft_does(order, monkeypatch):
    torch.manual_seed(0)
    reference = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(**CONFIG)).eval()
    if order:
        reference.add_adapter("other", peft.RoadConfig(**CONFIG))  # random too (init_weights=False)
    inputs = token_inputs(reference)
    with prepare.adopted(reference) as model:
        layers = rx.road_layers(model)
        context = prepare.ExportContext("rotate", None, order)
        with context.prepared(model) as prepared:
            inside = rx.road_layers(prepared)
            assert set(inside) == set(layers) and set(context.captured) == set(layers)
            assert all(isinstance(inside[p], prepare.CaptureLayer) and inside[p] is context.captured[p]
                       for p in layers)
            assert all(inside[p].base_layer is layers[p].base_layer for p in layers)  # same weights, no copy
            names = {n for p in layers for n, _ in inside[p].named_buffers(recurse=False)}
            assert names == ({"road_bank_c1_g8", "road_bank_c2_g8"} if order else
                             {"road_c1_default", "road_c2_default"})
            assert all(not dict(layer.named_buffers()) for layer in layers.values())  # the RoadLayers untouched
            calls = []
            real = torch_op.ROTATE
            monkeypatch.setattr(torch_op, "ROTATE", lambda *a: calls.append(1) or real(*a))
            with torch.no_grad():
                if order:
                    with rx.adapter_ids(prepared, torch.tensor([2, 1]), order):
                        ours = prepared(**inputs).logits
                else:
                    ours = prepared(**inputs).logits
            assert len(calls) == 4  # the rotation traced is the custom op: q and v of tiny-llama's 2 layers
        assert context.captured == {} and rx.road_layers(model) == layers  # the layers are back
    with torch.no_grad():
        names = ["other", "default"] if order else None
        theirs = reference(**inputs, adapter_names=names).logits if names else reference(**inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_merge_context_records_the_lazy_merges_in_the_context():
    torch.manual_seed(0)
    model = rx.get_road_model(tiny("tiny-llama"), rx.RoadConfig(**CONFIG))
    layers = rx.road_layers(model)
    context = prepare.ExportContext("merge", None, merges={})
    with context.prepared(model) as prepared:
        assert rx.road_layers(prepared) == {} and set(context.merges) == set(layers)
    assert rx.road_layers(model) == layers
