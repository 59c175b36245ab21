"""Multi-host path (``jax.distributed.initialize`` through ``cfws_jax.parallel``) on one machine:
two local processes, one CPU device each, gloo CPU collectives, coordinator on localhost.

Each process runs, on the global 2-device mesh: the histogram engine (max and exact integer
counts of a padded sharded batch), classifier evaluation (top-1 / top-5 / image count, padding
not counted) and the one-pass sequential calibration (every amax from maxima and exact
histograms reduced over both hosts, every integer weight code). The
test (the single-process reference, in this pytest process on one device, with the per-device
batch shapes of the two-process run so every float result is comparable bit for bit) asserts
both processes read identical results, equal to the reference. This file is also the worker
(``python tests/test_distributed.py worker PID PORT``). A heavier opt-in check (4 devices,
sequential and parallel calibration) is ``test_parallel.py::test_multihost_*``.

Skips when this jax has no gloo CPU collectives or localhost sockets are unavailable.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HW = 16  # tiny inputs: the test is about agreement, not about the model



def workload(mesh):
    """The three checks; ``mesh=None``: single process, one device, per-device batch shapes.

    Two-process run: eval batches of 4 (2 rows per device, the last of 7 images padded), one
    calibration batch of 4; single-process reference: batches of 2, calibration batches of 2."""
    import jax

    from cfws_jax import calib, parallel
    from cfws_jax.calib.state import u64_to_numpy
    from cfws_jax.evaluate import evaluate_classifier
    from cfws_jax.models import create_model
    from cfws_jax.ptq import get_preset, quantize

    sys.path.insert(0, HERE)
    from conftest import MemorySource as Source, numpy_init

    out = {}
    # histogram engine: 3 real rows (padded to 4 on the mesh), values exact, counts exact
    v = np.random.default_rng(3).normal(size=(3, 4, 4, 5)).astype(np.float32)
    if mesh is None:
        args = (v,)
    else:
        args = parallel.shard_batch(v, mesh)
    m = jax.jit(calib.max_abs)(*args[:1], mask=args[1] if mesh is not None else None)
    st = jax.jit(calib.update)(calib.init(64, "abs", "fixed", m), *args)
    to_host = (lambda a: np.asarray(a)) if mesh is None else (lambda a: parallel.to_host(a, mesh))
    out["hist"] = {"max": float(to_host(m)),
                   "counts": u64_to_numpy(jax.tree_util.tree_map(to_host, st.counts)).tolist(),
                   "n_seen": int(u64_to_numpy(jax.tree_util.tree_map(to_host, st.n_seen)))}

    model = create_model("repvgg_cifar_small", deploy=True)
    params = numpy_init(model, (1, HW, HW, 3), 0)
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (7, HW, HW, 3)).astype(np.float32)
    logits = np.asarray(jax.jit(model.apply)(params, x))
    y = np.where(np.arange(7) < 5, logits.argmax(-1), (logits.argmax(-1) + 1) % 10).astype(np.int32)
    f = jax.tree_util.Partial(jax.jit(lambda p, x: model.apply(p, x)), params)
    res = evaluate_classifier(f, Source(x, y), batch_size=2 if mesh is None else 4, progress=False, mesh=mesh)
    out["eval"] = {k: res[k] for k in ("top1", "top5", "images")}

    # one-pass sequential calibration (the ptq default): per point a max and an exact histogram
    # reduced over both hosts, the amax from it (percentile: host NumPy, no search to compile)
    batches = [x[0:2], x[2:4]] if mesh is None else [x[0:4]]
    cfg = get_preset("cfws_kl", act_method="percentile", calib_order="sequential")
    qm = quantize(model, params, batches, cfg, progress=False, mesh=mesh)
    out["amax"] = np.asarray(qm.act_amax, np.float32).view(np.uint32).tolist()
    out["int_weights"] = {n: {k: np.asarray(a).tolist() for k, a in sorted(q.items()) if np.asarray(a).dtype.kind in "iu"}
                          for n, q in sorted(qm.layers.items())}
    return out


def worker(pid: int, port: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from cfws_jax import parallel

    parallel.initialize_distributed(f"localhost:{port}", 2, pid)
    mesh = parallel.local_mesh()
    assert parallel.num_devices(mesh) == 2 and parallel.is_multi_process(mesh), mesh
    out = workload(mesh)
    print(json.dumps({"process": jax.process_index(), "devices": [str(d) for d in jax.devices()], **out}))


def _free_port() -> int:
    try:
        with socket.socket() as s:
            s.bind(("localhost", 0))
            return s.getsockname()[1]
    except OSError as e:
        pytest.skip(f"no localhost socket for the coordinator: {e}")


def test_two_processes_agree_with_single_process(tmp_path):
    import jax

    if "jax_cpu_collectives_implementation" not in jax.config.values:
        pytest.skip("this jax has no CPU collectives option (gloo)")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    logs = [(tmp_path / f"out{i}", tmp_path / f"err{i}") for i in range(2)]
    files = [(open(o, "w"), open(e, "w")) for o, e in logs]  # files, not pipes: no stalls on chatty gloo logs
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", str(i), str(port)], cwd=ROOT,
                              env=env, stdout=o, stderr=e, text=True) for i, (o, e) in enumerate(files)]
    ref = workload(None)  # the single-process reference, while the workers run
    outs = []
    try:
        for i, p in enumerate(procs):
            p.wait(timeout=240)
    except subprocess.TimeoutExpired:
        for q in procs:
            q.kill()
        raise
    finally:
        for o, e in files:
            o.close()
            e.close()
    for i, p in enumerate(procs):
        err = logs[i][1].read_text()
        if p.returncode != 0 and ("gloo" in err.lower() and ("not supported" in err or "UNIMPLEMENTED" in err)):
            pytest.skip(f"gloo CPU collectives unavailable here: {err.strip().splitlines()[-1]}")
        assert p.returncode == 0, "\n".join(ln for ln in err.splitlines() if "[Gloo]" not in ln)[-4000:]
        outs.append(json.loads(logs[i][0].read_text().strip().splitlines()[-1]))
    assert [o.pop("process") for o in outs] == [0, 1]
    assert outs[0] == outs[1]  # every host reads the same results
    got = outs[0]
    assert len(got.pop("devices")) == 2
    assert got["hist"]["n_seen"] == 3 * 4 * 4 * 5  # padding row not counted
    assert got["eval"]["images"] == 7
    assert got["eval"]["top1"] == pytest.approx(5 / 7)
    assert len(got["amax"]) > 5 and got["int_weights"]
    for k in ("hist", "eval", "amax", "int_weights"):
        assert got[k] == ref[k], k


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        sys.path.insert(0, ROOT)
        worker(int(sys.argv[2]), int(sys.argv[3]))
