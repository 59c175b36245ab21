"""orbax save/restore of variable pytrees: bit-identical round trips and error cases."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import cfws_jax
from cfws_jax.io import META_FILE, ORBAX_DIR, load_variables, read_metadata, save_variables


def _variables():
    rng = np.random.default_rng(0)
    return {
        "params": {
            "stage0": {"rbr_reparam": {"kernel": rng.standard_normal((3, 3, 3, 8)).astype(np.float32),
                                       "bias": rng.standard_normal(8).astype(np.float32)}},
            "linear": {"kernel": rng.standard_normal((8, 10)).astype(np.float32)},
        },
        "quant": {
            "codes": rng.integers(-128, 128, (3, 3, 3, 8), dtype=np.int8),
            "ucodes": rng.integers(0, 256, (5,), dtype=np.uint8),
            "bias_i32": rng.integers(-(2**31), 2**31 - 1, (8,), dtype=np.int32),
            "scale_bf16": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
            "half": rng.standard_normal((2, 3)).astype(np.float16),
            "f64": rng.standard_normal(4),
            "i64": np.array([2**62, -1], np.int64),
            "flags": np.array([True, False, True]),
            "scalar": np.array(0.125, np.float32),
            "np_scalar": np.int16(-7),
            "empty": np.zeros((0, 4), np.float32),
            "special": np.array([np.nan, -0.0, np.inf, -np.inf, 1e-45], np.float32),
            "jax": jnp.arange(6, dtype=jnp.int8).reshape(2, 3),
        },
        "batch_stats": {},
    }


def _assert_bit_identical(got, want, path="") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), path
        for k in want:
            _assert_bit_identical(got[k], want[k], f"{path}/{k}")
        return
    want = np.asarray(want)
    assert isinstance(got, np.ndarray), path
    assert got.dtype == want.dtype and got.shape == want.shape, path
    assert got.tobytes() == want.tobytes(), path


def test_round_trip_bit_identical(tmp_path):
    variables = _variables()
    meta = {"arch": "repvgg_a0", "form": "deploy", "source": "/x/y.pth", "nested": {"k": [1, 2]}}
    out = save_variables(tmp_path / "ckpt", variables, meta)
    assert out == str(tmp_path / "ckpt")
    assert sorted(os.listdir(out)) == sorted([META_FILE, ORBAX_DIR])
    got, got_meta = load_variables(tmp_path / "ckpt")
    _assert_bit_identical(got, variables)
    assert got_meta == {**meta, "cfws_jax_version": cfws_jax.__version__}
    doc = read_metadata(tmp_path / "ckpt")
    assert doc["tree"]["quant"]["codes"] == {"dtype": "int8", "shape": [3, 3, 3, 8]}
    assert doc["tree"]["batch_stats"] == {}


def test_overwrite_rules(tmp_path):
    v = {"params": {"w": np.ones(3, np.float32)}}
    save_variables(tmp_path / "c", v, {})
    with pytest.raises(ValueError, match="already exists"):
        save_variables(tmp_path / "c", v, {})
    v2 = {"params": {"w": np.full(2, 3, np.int8)}}
    save_variables(tmp_path / "c", v2, {"x": 1}, overwrite=True)
    got, meta = load_variables(tmp_path / "c")
    _assert_bit_identical(got, v2)
    assert meta["x"] == 1
    # never deletes a directory that is not a cfws_jax checkpoint
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(ValueError, match="not a cfws_jax checkpoint"):
        save_variables(other, v, {}, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"
    # an existing empty directory is fine
    (tmp_path / "empty").mkdir()
    save_variables(tmp_path / "empty", v, {})


@pytest.mark.parametrize("variables,match", [
    ({"params": {"a.b": np.zeros(1)}}, r"'a\.b'"),
    ({"params": {1: np.zeros(1)}}, r"key 1"),
    ({"params": {"w": [1.0, 2.0]}}, r"/params/w is a list"),
    ({"params": {"w": 3}}, r"/params/w is a int"),
    ({"params": {"w": np.array([object()])}}, r"object dtype"),
])
def test_bad_variables(tmp_path, variables, match):
    with pytest.raises(ValueError, match=match):
        save_variables(tmp_path / "c", variables, {})
    assert not (tmp_path / "c").exists()


def test_bad_metadata(tmp_path):
    with pytest.raises(ValueError, match="JSON"):
        save_variables(tmp_path / "c", {"w": np.zeros(1)}, {"bad": object()})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_variables(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a cfws_jax checkpoint"):
        load_variables(tmp_path / "plain")
    (tmp_path / "plain" / META_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a cfws_jax checkpoint"):
        load_variables(tmp_path / "plain")
    (tmp_path / "plain" / META_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        load_variables(tmp_path / "plain")

    save_variables(tmp_path / "c", {"params": {"w": np.ones(3, np.float32)}}, {})
    meta_path = tmp_path / "c" / META_FILE
    doc = json.loads(meta_path.read_text())
    doc["tree"]["params"]["w"]["dtype"] = "int8"  # JSON and orbax data disagree
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"leaf /params/w restored as \('float32', \[3\]\)"):
        load_variables(tmp_path / "c")
    doc["tree"]["params"]["v"] = {"dtype": "float32", "shape": [3]}  # leaf the data lacks
    doc["tree"]["params"]["w"]["dtype"] = "float32"
    meta_path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=str(tmp_path / "c")):
        load_variables(tmp_path / "c")

    save_variables(tmp_path / "d", {"w": np.ones(2)}, {})
    import shutil
    shutil.rmtree(tmp_path / "d" / ORBAX_DIR)
    with pytest.raises(ValueError, match="orbax data folder"):
        load_variables(tmp_path / "d")
