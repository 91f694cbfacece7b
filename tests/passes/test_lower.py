"""lower: tied rotations run as RotaryEmbedding on onnxruntime; portable keeps standard ops; outputs unchanged."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passes import testutil
from road_export.passes.lower import LowerPass


@settings(max_examples=25, deadline=None)
@given(g=st.sampled_from([2, 4, 8, 16]), groups=st.integers(1, 4), variant=st.sampled_from(["road_1", "road_2",
       "road_4"]), opset=st.sampled_from([20, 23]), batch=st.lists(st.integers(1, 4), min_size=1, max_size=2),
       seed=st.integers(0, 1000))
def test_lower_keeps_outputs(g, groups, variant, opset, batch, seed):
    model = testutil.road_model(5, g * groups, g, variant, seed=seed, rank=len(batch) + 1)
    model.opset_imports[""] = opset
    x = np.random.default_rng(seed).standard_normal((*batch, 5)).astype(np.float32)
    before = testutil.run(model, x)
    lower = LowerPass("onnxruntime")
    lower(model)
    assert testutil.count(model, "RotateTied", "road") == (1 if variant == "road_1" else 0)
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)
    back = LowerPass("portable")
    back(model)
    assert testutil.count(model, "RotateTied", "road") == 0 and testutil.count(model, "Rotate", "road") == 1
    assert "com.microsoft" not in {o.domain for o in model.graph.all_nodes()}
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)


def test_road_1_becomes_rotary_embedding():
    model = testutil.road_model(5, 16, 8, "road_1")
    result = LowerPass()(model)
    assert result.modified and result.changed == 1 and result.tied == 1 and result.generic == 0
    (function,) = model.functions.values()
    assert function.name == "RotateTied"
    assert any(n.op_type == "RotaryEmbedding" and n.domain == "com.microsoft" for n in function)
    model.opset_imports[""] = 23
    LowerPass()(model)
    (function,) = model.functions.values()
    assert any(n.op_type == "RotaryEmbedding" and n.domain == "" for n in function)


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown target"):
        LowerPass("tensorrt")
