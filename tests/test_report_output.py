"""Report files: strict JSON (no NaN / Infinity tokens), placeholder scales of all-zero channels left out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cfws_jax.io import OutputError
from cfws_jax.ptq.report import _real_scales, _zero_channels, report_text, write_report


def _report():
    return {"arch": "x", "config": {"a": 1},
            "layers": [{"layer": "l0", "weight_sqnr_db": float("inf"), "output_cosine": float("nan"),
                        "w_scale_max": np.float32(0.5), "center_surround_ratio": float("-inf")}],
            "totals": {"logits_sqnr_db": float("inf"), "images": 2}}


def test_json_report_is_strict_and_says_what_null_means(tmp_path):
    text = report_text(_report(), "r.json")
    for token in ("NaN", "Infinity"):
        assert token not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict token {c}"))
    assert doc["layers"][0]["weight_sqnr_db"] is None and doc["totals"]["logits_sqnr_db"] is None
    assert doc["layers"][0]["w_scale_max"] == 0.5 and "+inf" in doc["null_means"]
    write_report(_report(), str(tmp_path / "r.json"))
    with pytest.raises(OutputError, match="already exists"):
        write_report(_report(), str(tmp_path / "r.json"))
    write_report(_report(), str(tmp_path / "r.json"), overwrite=True)
    with pytest.raises(OutputError, match=r"\.json or \.csv"):
        write_report(_report(), str(tmp_path / "r.txt"))
    assert "l0" in (tmp_path / "r.json").read_text()


def test_scale_statistics_skip_all_zero_channels():
    codes = np.zeros((3, 3, 2, 4), np.int8)
    codes[..., 0] = 5
    codes[1, 1, 0, 2] = -1
    scale = np.array([0.01, 1.0, 0.02, 1.0], np.float32)  # channels 1 and 3: placeholder scale 1
    real = _real_scales(codes, scale)
    assert np.allclose(real, [0.01, 0.02]) and real.max() < 1
    assert _zero_channels({"w_codes": codes}) == 2
    c_codes = np.zeros((1, 1, 2, 4), np.int8)
    c_codes[..., 1] = 3  # a coarse-only channel is not a zero channel
    assert _zero_channels({"w_codes": codes, "c_codes": c_codes}) == 1
    assert _real_scales(np.zeros((2, 3), np.int8), np.float32(1.0)).size == 0  # per-tensor, all zero
    # a NumPy reference of the rule: max over channels with any non-zero code
    live = [c for c in range(4) if np.any(codes[..., c])]
    assert real.tolist() == scale[live].astype(np.float64).tolist()
