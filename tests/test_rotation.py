"""The rotation math against peft's own functions and the dense reference matrix."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.road.layer import _apply_road, _get_delta_weight, _prepare_cols

from road_export.core import rotation

VARIANTS = ["road_1", "road_2", "road_4"]


@st.composite
def rotations(draw):
    g = draw(st.sampled_from([2, 4, 8, 16]))
    d = g * draw(st.integers(1, 6))
    variant = draw(st.sampled_from(VARIANTS))
    seed = draw(st.integers(0, 2**31 - 1))
    n = rotation.params_length(variant, d)
    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    alpha = 1 + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return variant, g, d, theta, alpha, batch, gen


@settings(max_examples=60, deadline=None)
@given(rotations())
def test_math_against_dense_reference(case):
    variant, g, d, theta, alpha, batch, gen = case
    c1, c2 = rotation.coefficients(variant, g, theta, alpha)
    p1, p2 = _prepare_cols(variant, g, theta, alpha)
    torch.testing.assert_close(c1, p1, rtol=0, atol=0)
    torch.testing.assert_close(c2, p2, rtol=0, atol=0)
    R = rotation.dense_matrix(c1, c2, g)
    torch.testing.assert_close(R, _get_delta_weight(variant, g, theta, alpha), rtol=0, atol=1e-12)

    x = torch.randn(*batch, d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rotation.rotate(x, c1, c2, g), x @ R.T)
    torch.testing.assert_close(rotation.rotate(x, c1, c2, g), _apply_road(variant, g, theta, alpha, x))

    w = torch.randn(d, 5, generator=gen, dtype=torch.float64)
    merged = rotation.merge(w, c1, c2, g)
    torch.testing.assert_close(merged, R @ w)
    torch.testing.assert_close(rotation.unmerge(merged, c1, c2, g), w)
    torch.testing.assert_close(rotation.merge(w.T, c1, c2, g, axis=1), (R @ w).T)  # Conv1D layout
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rotation.merge(b, c1, c2, g), R @ b)

    i1, i2 = rotation.invert(c1, c2, g)
    torch.testing.assert_close(rotation.dense_matrix(i1, i2, g), torch.linalg.inv(R))

    # numpy gives the same numbers
    n1, n2 = rotation.coefficients(variant, g, theta.numpy(), alpha.numpy())
    np.testing.assert_allclose(rotation.merge(w.numpy(), n1, n2, g), merged.numpy(), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(rotations(), rotations())
def test_compose_is_matrix_product(a, b):
    variant, g, d, theta, alpha, _, gen = a
    variant_b = b[0]
    n = rotation.params_length(variant_b, d)
    theta_b = torch.randn(n, generator=gen, dtype=torch.float64)
    alpha_b = torch.randn(n, generator=gen, dtype=torch.float64)
    first = rotation.coefficients(variant, g, theta, alpha)
    second = rotation.coefficients(variant_b, g, theta_b, alpha_b)
    k1, k2 = rotation.compose(first, second, g)
    expected = rotation.dense_matrix(*second, g) @ rotation.dense_matrix(*first, g)
    torch.testing.assert_close(rotation.dense_matrix(k1, k2, g), expected)


def test_identity_is_identity():
    c1, c2 = rotation.identity(8)
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    np.testing.assert_array_equal(rotation.rotate(x, c1, c2, 4), x)


def test_group_size_checks():
    with pytest.raises(ValueError, match="not divisible"):
        rotation.check_group_size(12, 8, "q_proj")
    with pytest.raises(ValueError, match="even"):
        rotation.check_group_size(12, 3)


@settings(max_examples=30, deadline=None)
@given(rotations(), st.sampled_from([0, 1]))
def test_in_place_merge_equals_merge(case, axis):
    variant, g, d, theta, alpha, _, gen = case
    c1, c2 = rotation.coefficients(variant, g, theta, alpha)
    w = torch.randn(d, 3, generator=gen, dtype=torch.float64)
    w = w if axis == 0 else w.T.contiguous()
    expected = rotation.merge(w, c1, c2, g, axis=axis)
    torch.testing.assert_close(rotation.merge_(w.clone(), c1, c2, g, axis=axis), expected)
    np.testing.assert_allclose(rotation.merge_(w.numpy().copy(), c1.numpy(), c2.numpy(), g, axis=axis),
                               expected.numpy(), atol=1e-12)
