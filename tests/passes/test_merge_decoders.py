"""merge_decoders: the merged decoder's If runs either file's graph, judged against each file run on its own."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from road_export.passes.merge_decoders import USE_CACHE_BRANCH, MergeDecodersPass

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)
W = RNG.standard_normal(4).astype(np.float32)  # in both files under one name: stored once
B = RNG.standard_normal(4).astype(np.float32)  # the decoder's "b"; the other file's "b2" holds the same values
C = RNG.standard_normal(4).astype(np.float32)  # the other file's "b": same name, other values
COEF = RNG.standard_normal(4).astype(np.float32)  # an overridable input with a default, in both files


def _model(nodes, inputs, outputs, inits) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    proto.metadata_props.add(key="road_export.mode", value="rotate")
    return ir.serde.deserialize_model(proto)


def decoders(*, past_for_encoder: bool = True):
    """Two small decoders shaped like optimum's: logits and present.0.{decoder,encoder}.key without past;
    logits and present.0.decoder.key with past (the encoder's key comes from the past input)."""
    x = helper.make_tensor_value_info("input_ids", F, ["batch", "seq"] + [4])
    enc = helper.make_tensor_value_info("encoder_hidden_states", F, ["batch", "enc", 4])
    coef = helper.make_tensor_value_info("coef", F, [4])
    logits = helper.make_tensor_value_info("logits", F, ["batch", "seq", 4])
    dec_key = helper.make_tensor_value_info("present.0.decoder.key", F, ["batch", "total", 4])
    enc_key = helper.make_tensor_value_info("present.0.encoder.key", F, ["batch", "enc", 4])
    decoder = _model([
        helper.make_node("Mul", ["input_ids", "w"], ["t"], name="mul"),
        helper.make_node("Add", ["t", "b"], ["u"], name="add"),
        helper.make_node("Mul", ["u", "coef"], ["logits"], name="scale"),
        helper.make_node("Relu", ["input_ids"], ["present.0.decoder.key"], name="key"),
        helper.make_node("Neg", ["encoder_hidden_states"], ["present.0.encoder.key"], name="cross"),
    ], [x, enc, coef], [logits, dec_key, enc_key], {"w": W, "b": B, "coef": COEF})
    past_dec = helper.make_tensor_value_info("past_key_values.0.decoder.key", F, ["batch", "past", 4])
    past_enc = helper.make_tensor_value_info("past_key_values.0.encoder.key" if past_for_encoder else "other", F,
                                             ["batch", "enc", 4])
    with_past = _model([
        helper.make_node("Mul", ["input_ids", "w"], ["t"], name="mul"),
        helper.make_node("Add", ["t", "b2"], ["u"], name="add"),
        helper.make_node("Add", ["u", "b"], ["v"], name="add2"),
        helper.make_node("Mul", ["v", "coef"], ["logits"], name="scale"),
        helper.make_node("Relu", ["input_ids"], ["k"], name="key"),
        helper.make_node("Concat", ["past_key_values.0.decoder.key", "k"], ["present.0.decoder.key"], axis=1,
                         name="append"),
    ], [x, past_dec, past_enc, coef], [logits, dec_key], {"w": W, "b2": B, "b": C, "coef": COEF})
    return decoder, with_past


def run(model: ir.Model, feeds: dict) -> dict:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    known = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in known}), strict=True))


def feeds() -> dict:
    return {"input_ids": RNG.standard_normal((2, 3, 4)).astype(np.float32),
            "encoder_hidden_states": RNG.standard_normal((2, 5, 4)).astype(np.float32),
            "past_key_values.0.decoder.key": RNG.standard_normal((2, 6, 4)).astype(np.float32),
            "past_key_values.0.encoder.key": RNG.standard_normal((2, 5, 4)).astype(np.float32)}


def test_each_branch_computes_its_file():
    decoder, with_past = decoders()
    before = [ir.serde.serialize_model(m).SerializeToString() for m in (decoder, with_past)]
    result = MergeDecodersPass(with_past)(decoder)
    merged = result.model
    onnx.checker.check_model(ir.serde.serialize_model(merged), full_check=True)
    assert [m.SerializeToString() for m in map(ir.serde.serialize_model, (decoder, with_past))] == before  # untouched
    assert [n.op_type for n in merged.graph] == ["If"]
    assert [v.name for v in merged.graph.inputs] == [
        "input_ids", "encoder_hidden_states", "coef", "past_key_values.0.decoder.key",
        "past_key_values.0.encoder.key", USE_CACHE_BRANCH]
    assert [v.name for v in merged.graph.outputs] == ["logits", "present.0.decoder.key", "present.0.encoder.key"]
    # the with-past file's initializers come first (optimum's order): the decoder's w is its w (same name, same
    # values), the decoder's b its b2 (same values); its own b (other values) keeps the name
    assert sorted(merged.graph.initializers) == ["b", "b2", "coef", "w"] and result.shared == 2
    assert merged.metadata_props == {"road_export.mode": "rotate"}
    x = feeds()
    without = run(merged, {**x, USE_CACHE_BRANCH: np.array([False])})
    for name, value in run(decoder, x).items():
        np.testing.assert_array_equal(without[name], value)
    cached = run(merged, {**x, USE_CACHE_BRANCH: np.array([True])})
    for name, value in run(with_past, x).items():
        np.testing.assert_array_equal(cached[name], value)
    np.testing.assert_array_equal(cached["present.0.encoder.key"], x["past_key_values.0.encoder.key"])


def test_an_input_with_a_default_stays_overridable_in_both_branches():
    """`coef` is an input with a default in both files (a swappable coefficient): overriding it reaches either
    branch. Planted fault: had its default been shared as a constant, the override would change nothing."""
    decoder, with_past = decoders()
    merged = MergeDecodersPass(with_past)(decoder).model
    assert "coef" in {v.name for v in merged.graph.inputs}
    x = feeds()
    for branch in (False, True):
        plain = run(merged, {**x, USE_CACHE_BRANCH: np.array([branch])})["logits"]
        doubled = run(merged, {**x, "coef": 2 * COEF, USE_CACHE_BRANCH: np.array([branch])})["logits"]
        np.testing.assert_allclose(doubled, 2 * plain, rtol=1e-6)


def test_missing_past_input_is_refused():
    """Planted fault: the with-past file lacks the encoder key's past input, so nothing could pass it through."""
    decoder, with_past = decoders(past_for_encoder=False)
    with pytest.raises(ValueError, match="present.0.encoder.key has no past input past_key_values.0.encoder.key"):
        MergeDecodersPass(with_past)(decoder)
