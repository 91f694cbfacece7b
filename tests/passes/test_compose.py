"""compose: chained rotations with one group size become one."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from passes import testutil
from road_export.passes.compose import ComposePass


@settings(max_examples=25, deadline=None)
@given(g=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), chain=st.integers(2, 4),
       variant=st.sampled_from(["road_1", "road_2", "road_4"]), seed=st.integers(0, 1000))
def test_compose_keeps_outputs(g, groups, chain, variant, seed):
    model = testutil.road_model(5, g * groups, g, variant, chain=chain, seed=seed)
    x = np.random.default_rng(seed).standard_normal((2, 3, 5)).astype(np.float32)
    before = testutil.run(model, x)
    result = ComposePass()(model)
    assert result.modified and result.composed == chain - 1
    assert testutil.count(model, "Rotate", "road") == 1
    np.testing.assert_allclose(testutil.run(model, x), before, atol=1e-4, rtol=1e-4)


def test_different_group_sizes_are_left_alone():
    model = testutil.road_model(5, 16, 8, "road_2", chain=2)
    second = [n for n in model.graph if n.op_type == "Rotate"][1]
    import onnx_ir as ir

    second.attributes["group_size"] = ir.AttrInt64("group_size", 4)
    assert not ComposePass()(model).modified
