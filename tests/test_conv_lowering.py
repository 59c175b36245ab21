"""conv2d_unrolled (the learned-rounding step's conv lowering) against a NumPy loop and conv2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax.models.layers import conv2d, conv2d_unrolled

# (batch, size, in channels, out channels, kernel, stride, padding, groups)
GEOMETRIES = [
    (2, 9, 5, 7, 3, 1, 1, 1),  # dense 3x3 (RepVGG)
    (2, 9, 5, 7, 3, 2, 1, 1),  # dense 3x3 stride 2, odd size
    (1, 7, 3, 5, 1, 2, 0, 1),  # 1x1 stride 2
    (2, 6, 4, 6, 1, 1, 0, 1),  # 1x1 (pointwise)
    (2, 10, 6, 6, 3, 2, 1, 6),  # depthwise 3x3 stride 2 (MobileOne)
    (2, 8, 4, 4, 5, 1, 2, 4),  # depthwise 5x5
    (2, 8, 4, 4, 3, 1, 0, 4),  # depthwise, no padding
    (2, 8, 4, 8, 3, 1, 1, 2),  # grouped: falls back to conv2d
]


def numpy_conv(x, k, b, s, p, g):
    """Direct loop: NHWC x, HWIO k ``[kh, kw, C/g, O]``."""
    n, h, w, c = x.shape
    kh, kw, cg, o = k.shape
    og = o // g
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    y = np.zeros((n, ho, wo, o))
    for oc in range(o):
        grp = oc // og
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, i * s:i * s + kh, j * s:j * s + kw, grp * cg:(grp + 1) * cg]
                y[:, i, j, oc] = np.einsum("nhwc,hwc->n", patch, k[:, :, :, oc]) + b[oc]
    return y


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_unrolled_matches_numpy_and_conv2d(geom):
    n, hw, c, o, kk, s, p, g = geom
    rng = np.random.default_rng(hash(geom) % 2**32)
    x = rng.standard_normal((n, hw, hw, c)).astype(np.float32)
    k = rng.standard_normal((kk, kk, c // g, o)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    ref = numpy_conv(x.astype(np.float64), k.astype(np.float64), b.astype(np.float64), s, p, g)
    got = np.asarray(conv2d_unrolled(jnp.asarray(x), jnp.asarray(k), jnp.asarray(b), s, p, g))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, np.asarray(conv2d(x, k, b, s, p, g)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geom", GEOMETRIES[:6])
def test_unrolled_kernel_gradient_matches_conv2d(geom):
    n, hw, c, o, kk, s, p, g = geom
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((kk, kk, c // g, o)), jnp.float32)

    def loss(conv):
        return jax.grad(lambda kern: jnp.sum(jax.nn.relu(conv(x, kern, None, s, p, g)) ** 2))(k)

    np.testing.assert_allclose(np.asarray(loss(conv2d_unrolled)), np.asarray(loss(conv2d)), rtol=1e-4, atol=1e-4)
