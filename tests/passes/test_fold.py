"""fold: a constant rotation after MatMul/Gemm disappears into the weights; outputs unchanged."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passes import testutil
from road_export.passes.fold import FoldPass


@settings(max_examples=30, deadline=None)
@given(
    g=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), d_in=st.integers(1, 10),
    variant=st.sampled_from(["road_1", "road_2", "road_4"]), bias=st.booleans(),
    gemm=st.sampled_from([None, None, "transB", "plain"]), seed=st.integers(0, 1000),
    batch=st.integers(1, 5),
)
def test_fold_keeps_outputs(g, groups, d_in, variant, bias, gemm, seed, batch):
    rank = 2 if gemm else 3
    model = testutil.road_model(d_in, g * groups, g, variant, bias=bias, gemm=gemm, seed=seed, rank=rank)
    shape = (batch, d_in) if rank == 2 else (batch, 3, d_in)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    before = testutil.run(model, x)
    result = FoldPass()(model)
    assert result.modified and result.folded == 1
    assert testutil.count(model, "Rotate", "road") == 0 and not model.functions
    assert "road" not in model.opset_imports
    testutil.check_model(model)
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-4, rtol=1e-5)


def test_shared_weight_is_not_changed_for_its_other_user():
    import onnx_ir as ir

    model = testutil.road_model(4, 8, 4, "road_2", bias=False)
    w = model.graph.initializers["w"]
    other = ir.node("MatMul", [model.graph.inputs[0], w])
    model.graph.append(other)
    model.graph.outputs.append(other.outputs[0])
    assert FoldPass()(model).modified
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(), w.const_value.numpy())


@pytest.mark.parametrize("bias", [False, True])
def test_overridable_coefficients_are_not_folded(bias):
    model = testutil.road_model(4, 8, 4, "road_4", bias=bias)
    model.graph.inputs.append(model.graph.initializers["c1_0"])  # a graph input with a default: swappable
    fold = FoldPass()
    assert not fold(model).modified and testutil.count(model, "Rotate", "road") == 1
