"""The metadata keys road-export writes into ONNX files are a file format: files written by one version are read by
the next, so a key never changes with the code's module paths (a relayout once rewrote "road_export.quantize" into
"road_export.graph.quantize" because the key looked like a module name; files quantized before no longer read)."""

from __future__ import annotations

from types import ModuleType

import pytest

from road_export.core import names
from road_export.graph import inspection, quantize

# The keys as files hold them (docs/onnx-ops.md, docs/quantization.md, docs/generation.md): never rename one.
FILE_KEYS = {
    "METADATA_VERSION": "road_export.version",
    "METADATA_MODE": "road_export.mode",
    "METADATA_TASK": "road_export.task",
    "METADATA_ADAPTERS": "road_export.adapters",
    "METADATA_SEQ2SEQ": "road_export.seq2seq",
    "METADATA_SWAP": "road_export.swap",
    "METADATA_QUANTIZE": "road_export.quantize",
    "METADATA_ROPE": "road_export.rope",
    "METADATA_GRAPH": "road_export.graph",
}


def changed_keys(module: ModuleType) -> dict[str, tuple[str, str]]:
    """{constant: (expected key, the module's value)} for each file-format key `module` defines differently."""
    return {name: (key, getattr(module, name)) for name, key in FILE_KEYS.items()
            if hasattr(module, name) and getattr(module, name) != key}


@pytest.mark.parametrize("module", [names, inspection, quantize], ids=lambda m: m.__name__)
def test_the_metadata_keys_files_hold_do_not_change(module):
    assert not changed_keys(module)


def test_every_metadata_constant_is_a_known_file_key():
    """A new key joins FILE_KEYS (and the docs) when it is added, so it is frozen from its first file on."""
    declared = {n for n in vars(names) if n.startswith("METADATA_") and n != "METADATA_PREFIX"}
    assert declared == set(FILE_KEYS), declared ^ set(FILE_KEYS)


def test_a_renamed_key_is_caught(monkeypatch):
    """A check that can fail: the relayout's rewrite, planted back."""
    monkeypatch.setattr(quantize, "METADATA_QUANTIZE", "road_export.graph.quantize")
    assert changed_keys(quantize) == {"METADATA_QUANTIZE": ("road_export.quantize", "road_export.graph.quantize")}


def _file_with(tmp_path, **metadata) -> str:
    """A one-node ONNX file (Identity) carrying `metadata` (keys with `__` for `.`)."""
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    helper.set_model_props(model, {k.replace("__", "."): v for k, v in metadata.items()})
    path = tmp_path / "m.onnx"
    save(model, str(path))
    return str(path)


@pytest.mark.parametrize(("key", "text", "says"), [
    ("road_export.adapters", '{"a": 1}', "is a JSON dict, road-export writes a list"),
    ("road_export.adapters", '[{"name": "a"}]', "not an adapter record"),
    ("road_export.adapters", "[1,2", "is not JSON"),
    ("road_export.swap", '{"layer": 3}', "not a swap record"),
    ("road_export.swap", "[]", "is a JSON list, road-export writes a dict"),
    ("road_export.adapters", '[{"name": "a", "variant": "road_1", "group_size": 8, "layers": [], "id": "1"}]',
     "not an adapter record"),
])
def test_a_damaged_record_is_one_line_naming_the_key(key, text, says):
    with pytest.raises(names.RoadError, match=says) as caught:
        names.read_record({key: text}, key, "m.onnx")
    assert "m.onnx: its " + key in str(caught.value) and "re-export the file" in str(caught.value)


def test_a_good_record_reads_and_a_missing_one_is_the_default():
    record = [{"name": "a", "variant": "road_1", "group_size": 64, "layers": ["q"], "id": 1}]
    import json

    assert names.read_record({names.METADATA_ADAPTERS: json.dumps(record)}, names.METADATA_ADAPTERS, "m") == record
    assert names.read_record({}, names.METADATA_ADAPTERS, "m", []) == []


def test_inspect_and_runtime_refuse_a_damaged_record_with_one_line(tmp_path):
    """Files from the field (hand-edited metadata, another tool writing under our prefix): exit 2 with one line, not
    "internal error" (exit 3), from `inspect`, and a RoadError from RoadSession."""
    from test_cli import assert_bad_input, road_export

    from road_export.runtime import RoadSession

    path = _file_with(tmp_path, road_export__adapters='{"a": 1}')
    assert_bad_input(road_export("inspect", path), says="road_export.adapters metadata is a JSON dict")
    with pytest.raises(names.RoadError, match="road_export.adapters metadata"):
        RoadSession(path)


def test_adapter_ids_of_mixed_kinds_are_one_line(tmp_path):
    """`id`s of another kind than an integer (hand-edited): RoadSession, which orders the adapters by them, says so
    in one line."""
    import json

    from road_export.runtime import RoadSession

    records = [{"name": name, "variant": "road_1", "group_size": 8, "layers": [], "id": i}
               for name, i in (("a", "2"), ("b", 1))]
    path = _file_with(tmp_path, road_export__adapters=json.dumps(records))
    with pytest.raises(names.RoadError, match="road_export.adapters metadata holds .*'id': '2'.*, not an adapter "
                                              "record"):
        RoadSession(path)


def test_inspect_reads_a_damaged_quantize_record_as_unreadable(tmp_path):
    """A quantize record with fields of another kind (hand-edited): `inspect` shows it as unreadable, as it does a
    record that is not JSON, instead of failing."""
    from test_cli import road_export

    records = ('{"scheme": "int4", "block_size": 16, "int8_nodes": "many"}',
               '{"scheme": "int4", "block_size": 16, "int8_layers": 1e999}', "[1,")
    for record in records:
        path = _file_with(tmp_path, road_export__quantize=record)
        done = road_export("inspect", path)
        assert done.returncode == 0, done.stderr
        assert f"quantized: {record} (an unreadable road_export.graph.quantize record)" in done.stdout, done.stdout
