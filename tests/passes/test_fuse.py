"""fuse: decomposed rotations become one road node; outputs unchanged."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passes import testutil
from road_export.passes.fuse import FusePass


@st.composite
def cases(draw):
    g = draw(st.sampled_from([2, 4, 8, 16]))
    d = g * draw(st.integers(1, 4))
    return dict(
        d_in=draw(st.integers(1, 12)), d=d, g=g, variant=draw(st.sampled_from(["road_1", "road_2", "road_4"])),
        bias=draw(st.booleans()), rank=draw(st.sampled_from([2, 3])), seed=draw(st.integers(0, 1000)),
        form=draw(st.sampled_from(["gather", "slice"])),
        batch=draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)),
    )


@settings(max_examples=30, deadline=None)
@given(cases())
def test_fuse_keeps_outputs(case):
    batch = (case.pop("batch") * 2)[: case["rank"] - 1]
    model = testutil.decomposed_model(**case)
    x = np.random.default_rng(1).standard_normal((*batch, case["d_in"])).astype(np.float32)
    before = testutil.run(model, x)
    result = FusePass()(model)
    assert result.modified and result.fused == 1
    assert testutil.count(result.model, "Rotate", "road") == 1
    assert testutil.count(result.model, "Neg") == 0 and testutil.count(result.model, "Concat") == 0
    testutil.check_model(result.model)
    np.testing.assert_allclose(testutil.run(result.model, x), before, atol=1e-5, rtol=0)


def test_not_a_rotation_is_left_alone_and_says_why():
    model = testutil.decomposed_model(6, 16, 8, "road_2")
    for node in model.graph:
        if node.op_type == "Neg":
            node.op_type = "Relu"  # no longer a signed permutation
    result = FusePass(debug=True)(model)
    assert not result.modified and result.fused == 0
    assert any("not a data-movement op" in reason for reason in result.not_fired), result.not_fired


def test_a_signed_permutation_that_is_not_rot_is_not_fused():
    model = testutil.decomposed_model(6, 16, 8, "road_2")
    nodes = {n.outputs[0].name: n for n in model.graph}
    x1, x2 = nodes["x1"].outputs[0], nodes["x2"].outputs[0]
    nodes["nx2"].replace_input_with(0, x1)  # stack(-x1, x2) instead of stack(-x2, x1)
    nodes["u2"].replace_input_with(0, x2)
    x = np.random.default_rng(0).standard_normal((2, 3, 6)).astype(np.float32)
    before = testutil.run(model, x)
    result = FusePass(debug=True)(model)
    assert not result.modified
    assert any("not rot(x) for any group size" in r for r in result.not_fired), result.not_fired
    np.testing.assert_array_equal(testutil.run(model, x), before)


@pytest.mark.parametrize("swap", [False, True])
def test_operand_order_does_not_matter(swap):
    model = testutil.decomposed_model(5, 8, 4, "road_4")
    if swap:
        for node in model.graph:
            if node.op_type in ("Mul", "Add"):
                a, b = node.inputs
                node.replace_input_with(0, b)
                node.replace_input_with(1, a)
    x = np.random.default_rng(2).standard_normal((2, 3, 5)).astype(np.float32)
    before = testutil.run(model, x)
    assert FusePass()(model).modified
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-5, rtol=0)
