"""Data parallelism (``cfws_jax.parallel``): results do not depend on the device count.

The multi-device checks run ``tests/_parallel_check.py`` in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (the flag must be set before JAX is
imported) and compare a 4-device run with the single-device run: identical activation amax (bit
for bit), identical integer weights, identical top-1 / top-5 / image counts, for parallel and
sequential calibration, with batches not divisible by the device count (padding rows must not
count); the histogram engine on a sharded padded batch against one device; detector evaluation.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cfws_jax import calib, parallel
from cfws_jax.calib.state import u64_to_numpy

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def run_check(*what: str, timeout: int = 600) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(HERE, "_parallel_check.py"), *what], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["devices"]) == 4, out["devices"]
    return out


@pytest.fixture(scope="module")
def multi():
    return run_check("sequential", "parallel", "engine")


@pytest.mark.parametrize("order", ["sequential", "parallel"])
def test_calibration_and_eval_independent_of_device_count(multi, order):
    one, four = multi[order]["one"], multi[order]["four"]
    amax1 = np.asarray(one["amax"], np.uint32).view(np.float32)
    amax4 = np.asarray(four["amax"], np.uint32).view(np.float32)
    assert len(amax1) > 5 and np.all(amax1 > 0)
    bad = np.nonzero(amax1 != amax4)[0]
    assert bad.size == 0, (bad, amax1[bad], amax4[bad])
    assert one["int_weights"] == four["int_weights"] and one["int_weights"]
    for k in ("top1", "top5", "images", "float_top1", "float_images"):
        assert one[k] == four[k], k
    # 9 images evaluated (not the 12 rows of the padded 4-device batches); 6 labels are the float argmax
    assert four["images"] == four["float_images"] == 9
    assert four["float_top1"] >= 6 / 9


def test_histogram_engine_on_sharded_padded_batch(multi):
    single, sharded = multi["engine"]["single"], multi["engine"]["sharded"]
    assert sharded["padded"] == 8 and "batch" in sharded["sharding"]
    for k in ("max", "counts", "n_seen", "vmin", "vmax"):
        assert single[k] == sharded[k], k
    assert single["n_seen"] == 2 * 5 * 3 * 3 * 7  # two updates of the 5 real rows; padding not counted


@pytest.mark.skipif(importlib.util.find_spec("pycocotools") is None or importlib.util.find_spec("PIL") is None,
                    reason="needs pycocotools and Pillow")
def test_detector_eval_independent_of_device_count():
    if not os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "coco128")):
        pytest.skip("coco128 not in ../shared/data")
    out = run_check("detection")["detection"]
    assert out["one"] == out["four"]
    assert out["four"]["images"] == 10 and out["four"]["mAP"] > 0.95


@pytest.mark.skipif(os.environ.get("CFWS_TEST_MULTIHOST") != "1",
                    reason="set CFWS_TEST_MULTIHOST=1 (two JAX processes with gloo; ~1.5 min on 2 idle cores)")
def test_multihost_two_processes_match_single_process(multi, tmp_path):
    """jax.distributed.initialize with 2 local processes x 2 CPU devices (gloo): the same amax,
    integer weights and top-1 as the single-process runs."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = os.path.join(HERE, "_parallel_check.py")
    logs = [(open(tmp_path / f"out{i}", "w"), open(tmp_path / f"err{i}", "w")) for i in range(2)]  # no pipe stalls
    procs = [subprocess.Popen([sys.executable, script, "multihost", str(i), str(port)], cwd=ROOT, env=env,
                              stdout=o, stderr=e, text=True) for i, (o, e) in enumerate(logs)]
    outs = []
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        err = (tmp_path / f"err{i}").read_text()
        assert p.returncode == 0, "\n".join(ln for ln in err.splitlines() if "[Gloo]" not in ln)[-4000:]
        outs.append(json.loads((tmp_path / f"out{i}").read_text().strip().splitlines()[-1]))
    for o, e in logs:
        o.close()
        e.close()
    assert outs[0]["multihost"] == outs[1]["multihost"]  # every host reads the same results
    assert len(outs[0]["devices"]) == 4
    for order in ("sequential", "parallel"):
        got = outs[0]["multihost"][order]["four"]
        for k in ("amax", "int_weights", "top1", "top5", "images", "float_top1", "float_images"):
            assert got[k] == multi[order]["one"][k], (order, k)


# ----------------------------------------------------------------------------- single process
def test_local_mesh_and_shard_batch_pad_and_mask():
    mesh = parallel.local_mesh()
    assert parallel.num_devices(mesh) == len(jax.local_devices())
    assert parallel.device_list(parallel.local_mesh(1)) == [str(jax.local_devices()[0])]
    with pytest.raises(ValueError, match="--devices"):
        parallel.local_mesh(len(jax.local_devices()) + 1)
    x = np.arange(3 * 2, dtype=np.float32).reshape(3, 2)
    xs, ms = parallel.shard_batch(x, mesh, size=5)
    n = parallel.padded_size(5, mesh)
    assert xs.shape == (n, 2) and ms.shape == (n,) and n >= 5 and n % parallel.num_devices(mesh) == 0
    np.testing.assert_array_equal(np.asarray(xs)[:3], x)
    assert np.all(np.asarray(xs)[3:] == 0)
    np.testing.assert_array_equal(np.asarray(ms), np.arange(n) < 3)


def _numpy_hist(v, amax, bins):
    """Slow reference: float64 floor(v / width), clipped into the last bin."""
    width = np.float64(np.float32(np.float32(amax) / bins))
    idx = np.minimum(np.floor(v.astype(np.float64) / width), bins - 1).astype(int)
    return np.bincount(idx, minlength=bins)


@pytest.mark.parametrize("mode", ["abs", "relu", "signed"])
def test_update_mask_ignores_masked_rows(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 5, 3)).astype(np.float32)
    pad = np.concatenate([x, np.full((3, 5, 3), 100.0, np.float32)])  # huge values in padding rows
    pad[5, 0, 0], pad[6, 1, 1] = np.nan, np.inf
    mask = np.arange(7) < 4
    m = float(calib.max_abs(x, mode))
    assert float(calib.max_abs(pad, mode, mask=mask)) == m
    a = calib.update(calib.init(32, mode, "fixed", m), x)
    b = jax.jit(calib.update)(calib.init(32, mode, "fixed", m), pad, mask)
    for f in ("counts", "n_seen", "n_nan", "n_inf", "n_clipped"):
        np.testing.assert_array_equal(u64_to_numpy(getattr(a, f)), u64_to_numpy(getattr(b, f)), f)
    assert float(a.vmin) == float(b.vmin) and float(a.vmax) == float(b.vmax)
    if mode == "abs":
        np.testing.assert_array_equal(u64_to_numpy(b.counts)[0], _numpy_hist(np.abs(x).ravel(), m, 32))
    with pytest.raises(ValueError, match="mask"):
        calib.update(calib.init(32, mode, "fixed", m), x, np.ones((3,), bool))


# ----------------------------------------------------------------------------- commands
def test_commands_device_flag_and_json(capsys, monkeypatch, tmp_path):
    from cfws_jax import cli
    from cfws_jax.commands import demo as demo_cmd  # noqa: F401
    import cfws_jax.demo

    n = len(jax.local_devices())
    devices = [str(d) for d in jax.local_devices()]
    for argv in (["eval", "--arch", "repvgg_cifar_small", "--params", str(tmp_path), "--data", str(tmp_path)],
                 ["ptq", "--arch", "repvgg_cifar_small", "--params", str(tmp_path), "--calib-data", str(tmp_path),
                  "--out", str(tmp_path / "q")],
                 ["demo", "--data", str(tmp_path)]):
        capsys.readouterr()
        assert cli.main(argv + ["--devices", str(n + 1), "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert "--devices" in err and f"{n} local device" in err, err

    seen = {}

    def fake_run_demo(data, **kw):
        seen.update(kw)
        return 0.5, [], {"arch": "a", "data": data, "eval_images": 1, "calib_images": 1, "seed": 0,
                         "device": devices[0]}

    monkeypatch.setattr(cfws_jax.demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(cfws_jax.demo, "format_table", lambda *a: "table")
    assert cli.main(["demo", "--json", "--devices", "1", "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out.strip().splitlines()[-1])["devices"] == devices[:1]
    assert f"devices: 1 device: {devices[0]}" in cap.err
    assert parallel.device_list(seen["mesh"]) == devices[:1]
