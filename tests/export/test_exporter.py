"""Export in both modes: parity with torch and with peft, one road node per layer, metadata, failure modes."""

import copy
import json

import onnx
import peft
import pytest
import torch
from conftest import tiny

import road_export as rx
from road_export import RoadConfig, RoadError
from road_export.app.testing import assert_onnx_parity
from road_export.app.verify import verify

VARIANTS = ["road_1", "road_2", "road_4"]
MODES = ["merge", "rotate"]
# Targets that all feed the exported output (BERT's pooler does not feed last_hidden_state).
TARGETS = {
    "tiny-llama": "all-linear",
    "tiny-qwen2": "all-linear",
    "tiny-bert": r".*encoder.*(query|key|value|dense)",
    "tiny-opt": "all-linear",
    "tiny-gpt2": "all-linear",
}
PEFT_OK = {"tiny-llama", "tiny-qwen2", "tiny-bert", "tiny-opt"}  # peft cannot wrap GPT-2's Conv1D


def adapted(name, variant, seed=0):
    torch.manual_seed(seed)
    model = tiny(name)
    return rx.get_road_model(model, RoadConfig(variant=variant, group_size=8, init_weights=False,
                                               target_modules=TARGETS[name]))


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """(name, variant, mode) -> (model, ExportResult); each combination exported once per session."""
    root = tmp_path_factory.mktemp("exports")
    cache = {}

    def get(name, variant, mode):
        key = (name, variant, mode)
        if key not in cache:
            model = adapted(name, variant)
            result = rx.export(model, root / f"{name}-{variant}-{mode}.onnx", mode=mode)
            cache[key] = (model, result)
        return cache[key]

    return get


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(TARGETS))
def test_parity_with_torch(exports, name, variant, mode):
    model, result = exports(name, variant, mode)
    report = assert_onnx_parity(result.path, model)
    assert len(report.rows) >= 3 and all(r.max_abs <= 1e-4 for r in report.rows)
    road_nodes = [n for n in onnx.load(result.path).graph.node if n.domain == "road"]
    if mode == "rotate":
        assert len(road_nodes) == len(rx.road_layers(model)) == result.road_nodes
    else:
        assert not road_nodes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", sorted(PEFT_OK))
def test_parity_with_peft_forward(exports, name, variant, mode):
    ours, result = exports(name, variant, mode)
    base = tiny(name)
    theirs = peft.get_peft_model(base, peft.RoadConfig(variant=variant, group_size=8,
                                                        target_modules=TARGETS[name])).eval()
    state = {k.removeprefix("base_model.model."): v for k, v in theirs.state_dict().items() if "road_" in k}
    theirs.load_state_dict({"base_model.model." + k: v for k, v in ours.state_dict().items()
                            if k in state}, strict=False)
    assert_onnx_parity(result.path, theirs)


def test_live_peft_model_exports_and_is_left_intact(tmp_path):
    torch.manual_seed(4)
    theirs = peft.get_peft_model(tiny("tiny-llama"), peft.RoadConfig(variant="road_1", group_size=8,
                                                                      init_weights=False)).eval()
    before = {k: v.clone() for k, v in theirs.state_dict().items()}
    modules_before = [type(m).__name__ for m in theirs.modules()]
    for mode in MODES:
        result = rx.export(theirs, tmp_path / f"{mode}.onnx", mode=mode)
        assert_onnx_parity(result.path, theirs)
    assert [type(m).__name__ for m in theirs.modules()] == modules_before
    assert all(torch.equal(v, before[k]) for k, v in theirs.state_dict().items())


def test_merged_export_has_the_base_models_operators(exports, plain_llama):
    model, result = exports("tiny-llama", "road_4", "merge")
    base = plain_llama()  # tiny-llama exported without adapter
    ops = lambda p: sorted(n.op_type for n in onnx.load(p).graph.node)  # noqa: E731
    assert ops(result.path) == ops(base)


def test_export_leaves_the_model_as_it_was(exports, tmp_path):
    model = adapted("tiny-opt", "road_2")
    before = copy.deepcopy(model.state_dict())
    for mode in MODES:
        rx.export(model, tmp_path / f"{mode}.onnx", mode=mode)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    # no stand-in left in the tree and no coefficient buffer on the layers (the export's state is its ExportContext)
    assert all(type(layer) is rx.RoadLayer and not layer.merged and not dict(layer.named_buffers())
               for layer in rx.road_layers(model).values())


def test_metadata(exports):
    model, result = exports("tiny-qwen2", "road_1", "rotate")
    meta = {p.key: p.value for p in onnx.load(result.path).metadata_props}
    assert meta["road_export.mode"] == "rotate" and meta["road_export.task"] == "text-generation"  # optimum's name
    assert meta["road_export.version"] == rx.__version__
    (adapter,) = json.loads(meta["road_export.adapters"])
    assert adapter["name"] == "default" and adapter["variant"] == "road_1" and adapter["group_size"] == 8
    assert sorted(adapter["layers"]) == sorted(rx.road_layers(model))


def test_files_with_the_old_task_names_still_verify(exports, tmp_path):
    model, result = exports("tiny-qwen2", "road_1", "rotate")
    old = onnx.load(result.path)
    for prop in old.metadata_props:
        if prop.key == "road_export.task":
            prop.value = "causal-lm"  # what road-export 0.1 wrote
    onnx.save(old, tmp_path / "old.onnx")
    assert verify(tmp_path / "old.onnx", model, shapes=((2, 5, 1),)).passed
    assert verify(result.path, model, task="causal-lm", shapes=((2, 5, 1),)).passed


def test_names_and_dynamic_axes(exports):
    _, result = exports("tiny-bert", "road_2", "rotate")
    graph = onnx.load(result.path).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    assert [i.name for i in inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert [o.name for o in graph.output] == ["last_hidden_state"]
    dims = [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in inputs]
    assert dims == [["batch_size", "sequence_length"]] * 3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name,variant", [("tiny-llama", "road_4"), ("tiny-gpt2", "road_1")])
def test_fp16(tmp_path, name, variant, mode):
    model = adapted(name, variant)
    result = rx.export(model, tmp_path / "h.onnx", mode=mode, dtype="float16")
    report = assert_onnx_parity(result.path, model)
    assert report.dtype == "float16" and report.atol == 2e-2


def test_external_data(tmp_path):
    model = adapted("tiny-llama", "road_2")
    result = rx.export(model, tmp_path / "m.onnx", mode="rotate", external_data=True)
    assert result.external_data == tmp_path / "m.onnx.data" and result.external_data.stat().st_size > 100_000
    proto = onnx.load(result.path, load_external_data=False)
    big = [t for t in proto.graph.initializer if t.dims and int(torch.tensor(list(t.dims)).prod()) >= 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.default.onnx_adapter", "m.onnx", "m.onnx.data"]
    assert verify(result.path, model).passed


def test_plain_module_with_example_inputs(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    rx.get_road_model(net, RoadConfig(variant="road_4", group_size=8, init_weights=False, target_modules=["0", "2"]))
    x = torch.randn(3, 16)
    result = rx.export(net, tmp_path / "n.onnx", mode="rotate", example_inputs=(x,))
    import onnxruntime as ort

    out = ort.InferenceSession(str(result.path)).run(None, {"input_0": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), net(x).detach(), atol=1e-5, rtol=0)
    assert result.road_nodes == 2


def test_failed_export_leaves_no_file(tmp_path):
    model = adapted("tiny-llama", "road_1")
    with pytest.raises(RoadError, match="does not exist"):
        rx.export(model, tmp_path / "missing" / "m.onnx")
    target = tmp_path / "m.onnx"
    with pytest.raises(RoadError, match="must be \\['input_ids', 'attention_mask'\\]"):
        rx.export(model, target, example_inputs={"input_ids": torch.zeros(2, 3, 4)}, task="causal-lm")
    with pytest.raises(RoadError, match="torch.onnx.export failed"):
        rx.export(model, target, example_inputs={"input_ids": torch.zeros(2, 3), "attention_mask": torch.ones(2, 3)},
                  task="causal-lm")
    with pytest.raises(RoadError, match="unknown mode"):
        rx.export(model, target, mode="fold")
    with pytest.raises(RoadError, match="no RoAd adapter"):
        rx.export(tiny("tiny-llama"), target)
    assert list(tmp_path.iterdir()) == []
