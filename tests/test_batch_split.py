"""Batch-split invariance of calibration (issue #15): for every amax method and both orders, the
amax of every quantization point from ``[x]`` equals that from ``[x[:k], x[k:]]`` and from three
uneven batches (two-pass fixed-range histograms with exact counts, ALGORITHM.md §4.2)."""

from __future__ import annotations

import numpy as np
import pytest

from cfws_jax.calib import METHODS
from cfws_jax.ptq import get_preset, quantize
from test_ptq import _images, _tiny_params


@pytest.mark.parametrize("order", ["sequential", "parallel"])
@pytest.mark.parametrize("method", METHODS)
def test_amax_does_not_depend_on_the_batch_split(method, order):
    model, variables = _tiny_params()
    x = _images(7, seed=3)
    cfg = get_preset("cfws_kl", act_method=method, other_act_method=method, input_method=method,
                     num_bins=512, calib_order=order)
    splits = {"one": [x], "two": [x[:3], x[3:]], "three": [x[:1], x[1:5], x[5:]]}
    amax = {k: np.asarray(quantize(model, variables, b, cfg, progress=False).act_amax) for k, b in splits.items()}
    assert np.all(amax["one"] > 0)
    np.testing.assert_array_equal(amax["two"], amax["one"], err_msg=f"{method}/{order}: 2 batches")
    np.testing.assert_array_equal(amax["three"], amax["one"], err_msg=f"{method}/{order}: 3 batches")
