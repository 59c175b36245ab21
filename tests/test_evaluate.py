"""evaluate_classifier and `cfws-jax eval` vs a NumPy top-k reference."""

from __future__ import annotations

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfws_jax import cli
from cfws_jax.data import CIFAR10, ImageSource
from cfws_jax.evaluate import evaluate_classifier, pad_batch, topk_correct


def ref_hits(logits, labels, k):
    """Per row: label among the k largest logits, ties broken toward the lower class index."""
    logits = np.asarray(logits, np.float64)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return np.array([labels[i] in order[i] for i in range(len(labels))])


class LogitSource(ImageSource):
    """Test source whose 'images' are ``[N, 1, 1, C]`` arrays holding the logits themselves."""

    def __init__(self, logits, labels, num_classes=None):
        self.x = np.asarray(logits, np.float32)[:, None, None, :]
        self.y = np.asarray(labels, np.int32)
        self.spec, self.split = "logits", "test"
        self.num_images = len(self.y)
        self.num_classes = num_classes or self.x.shape[-1]
        self.image_size = (1, 1)
        self.normalization = CIFAR10

    def load(self, indices):
        idx = self._check_indices(indices)
        return self.x[idx], self.y[idx]


def counting_identity():
    traces = []

    def apply_fn(x):
        traces.append(x.shape)  # runs only while tracing
        return x.reshape(x.shape[0], -1)

    return apply_fn, traces


def tie_heavy_logits(n, c, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, size=(n, c)).astype(np.float32), rng.integers(0, c, size=n)


# ----------------------------------------------------------------------------- counting

def test_topk_correct_vs_reference_with_ties_and_mask():
    logits, labels = tie_heavy_logits(200, 7, 0)
    mask = np.random.default_rng(1).random(200) < 0.7
    for k in (1, 3, 5, 7):
        got = int(topk_correct(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), k))
        assert got == int((ref_hits(logits, labels, k) & mask).sum())


def test_pad_batch():
    x, y, m = pad_batch(np.ones((3, 2, 2, 3)), [4, 5, 6], 5)
    assert x.shape == (5, 2, 2, 3) and x.dtype == np.float32 and (x[3:] == 0).all()
    np.testing.assert_array_equal(y, [4, 5, 6, 0, 0])
    np.testing.assert_array_equal(m, [True, True, True, False, False])
    with pytest.raises(ValueError, match="batch_size 2"):
        pad_batch(np.ones((3, 1)), [0, 1, 2], 2)


@pytest.mark.parametrize("n,bs,limit", [(10, 4, None), (10, 4, 7), (9, 3, None), (5, 16, None), (10, 4, 100)])
def test_evaluate_vs_reference_one_compile(n, bs, limit):
    logits, labels = tie_heavy_logits(n, 8, n + bs)
    apply_fn, traces = counting_identity()
    src = LogitSource(logits, labels)
    res = evaluate_classifier(apply_fn, src, batch_size=bs, limit=limit, progress=False)
    m = n if limit is None else min(limit, n)
    sel = np.floor((np.arange(m) + 0.5) * n / m).astype(int)  # no known labels: evenly spaced
    assert res["images"] == m
    assert res["top1"] == ref_hits(logits[sel], labels[sel], 1).sum() / m
    assert res["top5"] == ref_hits(logits[sel], labels[sel], 5).sum() / m
    assert traces == [(bs, 1, 1, 8)]  # padded last batch: exactly one trace / compilation


def test_evaluate_partial_passes_variables_as_jit_arguments():
    logits, labels = tie_heavy_logits(10, 6, 9)
    seen = []

    def fn(scale, x):
        seen.append(scale)
        return x.reshape(x.shape[0], -1) * scale  # a positive scale keeps the ranking

    res = evaluate_classifier(jax.tree_util.Partial(fn, jnp.float32(2.0)), LogitSource(logits, labels),
                              batch_size=4, progress=False)
    assert len(seen) == 1 and isinstance(seen[0], jax.core.Tracer)  # an argument, not a constant
    assert res["top1"] == ref_hits(logits, labels, 1).sum() / 10
    assert res["top5"] == ref_hits(logits, labels, 5).sum() / 10


def test_evaluate_is_deterministic_and_shows_rate(capsys, monkeypatch):
    monkeypatch.delenv("CFWS_JAX_NO_PROGRESS", raising=False)
    logits, labels = tie_heavy_logits(30, 10, 5)
    src = LogitSource(logits, labels)
    a = evaluate_classifier(lambda x: x.reshape(x.shape[0], -1), src, batch_size=8)
    err = capsys.readouterr().err
    assert "img/s" in err and "30/30" in err
    b = evaluate_classifier(lambda x: x.reshape(x.shape[0], -1), src, batch_size=8, progress=False)
    assert a == b and capsys.readouterr().err == ""


def test_evaluate_fewer_than_five_classes_and_errors():
    logits, labels = tie_heavy_logits(11, 3, 2)
    res = evaluate_classifier(lambda x: x.reshape(x.shape[0], -1), LogitSource(logits, labels),
                              batch_size=4, progress=False)
    assert res["top5"] is None and res["top1"] == ref_hits(logits, labels, 1).sum() / 11
    with pytest.raises(ValueError, match="has 10 classes but the model outputs 3"):
        evaluate_classifier(lambda x: x.reshape(x.shape[0], -1),
                            LogitSource(logits, labels, num_classes=10), batch_size=4, progress=False)
    with pytest.raises(ValueError, match="no images"):
        evaluate_classifier(lambda x: x, LogitSource(logits, labels), limit=0, progress=False)
    with pytest.raises(ValueError, match="logits"):
        evaluate_classifier(lambda x: x, LogitSource(logits, labels), batch_size=4, progress=False)


# ----------------------------------------------------------------------------- command

ROWS, COLS = np.array([0, 1, 2, 3, 4, 5, 6, 7, 0, 7]), np.array([0, 1, 2, 3, 4, 5, 6, 7, 7, 0])


def gather_model(x):
    """Fake 10-class model: logits = channel-0 pixels at fixed positions (ties are common)."""
    return x[:, ROWS, COLS, 0]


def ref_from_npz(path, limit, first=False):
    """Reference counts straight from the uint8 arrays: normalization is monotonic per channel.
    ``limit`` images: the first ones, or per class (largest-remainder quota, evenly spaced)."""
    with np.load(path) as z:
        x, y = z["x_test"], z["y_test"]
    if limit is not None and limit < len(y):
        sel = np.arange(limit) if first else ref_balanced(y, limit)
        x, y = x[sel], y[sel]
    vals = x[:, ROWS, COLS, 0].astype(np.int64)
    return ref_hits(vals, y, 1).sum() / len(y), ref_hits(vals, y, 5).sum() / len(y), len(y)


def ref_balanced(y, n):
    """Slow stratified pick: class quota n*m_c/N by largest remainder, then evenly spaced members."""
    classes = sorted(set(y.tolist()))
    sizes = [int((y == c).sum()) for c in classes]
    quota = [n * m / len(y) for m in sizes]
    take = [int(np.floor(q)) for q in quota]
    order = sorted(range(len(classes)), key=lambda i: (-(quota[i] - take[i]), i))
    for i in order[:n - sum(take)]:
        take[i] += 1
    picked = []
    for c, m, k in zip(classes, sizes, take):
        members = [i for i in range(len(y)) if y[i] == c]
        picked += [members[int((j + 0.5) * m / k)] for j in range(k)]
    return np.array(sorted(picked))


def make_npz(path, n=45):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(n, 8, 8, 3), dtype=np.uint8) * 60  # few values -> many ties
    y = np.sort(rng.integers(0, 10, size=n))
    np.savez(path, x_train=x[:5], y_train=y[:5], x_test=x, y_test=y,
             classes=np.array([f"c{i}" for i in range(10)]))
    return path


def run_cli(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_command_json_with_injected_model(tmp_path, capsys, monkeypatch):
    from cfws_jax.commands import eval as eval_cmd

    data = make_npz(tmp_path / "d.npz")
    seen = {}

    def fake_build(arch, *, params=None, quantized=None):
        seen.update(arch=arch, params=params, quantized=quantized)
        return gather_model

    monkeypatch.setattr(eval_cmd, "build_apply_fn", fake_build)
    rc, out, err = run_cli(["eval", "--arch", "tiny", "--params", str(tmp_path), "--data", str(data),
                            "--split", "test", "--limit", "30", "--batch-size", "8", "--json",
                            "--no-progress"], capsys)
    assert rc == 0 and seen == {"arch": "tiny", "params": str(tmp_path), "quantized": None}
    res = json.loads(out.strip().splitlines()[-1])
    top1, top5, n = ref_from_npz(data, 30)
    devices = [str(d) for d in jax.local_devices()]
    y = np.load(data)["y_test"]
    picked = y[ref_balanced(y, 30)]
    counts = [int((picked == c).sum()) for c in sorted(set(y.tolist()))]  # every class present in the split
    per = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    assert res == {"top1": top1, "top5": top5, "images": n, "devices": devices,
                   "subset": f"30 of 45 test images, {per} per class"}
    rc, out, err = run_cli(["eval", "--arch", "tiny", "--params", str(tmp_path), "--data", str(data),
                            "--split", "test", "--limit", "30", "--first", "--json", "--no-progress"], capsys)
    top1, top5, n = ref_from_npz(data, 30, first=True)
    res = json.loads(out.strip().splitlines()[-1])
    assert (res["top1"], res["top5"], res["images"]) == (top1, top5, n)
    assert len(out.strip().splitlines()) == 1 and "d.npz" in err  # other output on stderr
    assert f"devices: {len(devices)} device" in err and devices[0] in err
    rc, out, _ = run_cli(["eval", "--arch", "tiny", "--quantized", "q", "--data", str(data),
                          "--no-progress"], capsys)
    top1, _, n = ref_from_npz(data, None)
    assert rc == 0 and seen["quantized"] == "q" and f"top-1 {100 * top1:.2f}%" in out and f"(all {n} val images)" in out


def test_eval_command_float_params_path(tmp_path, capsys, monkeypatch):
    import cfws_jax.models

    data = make_npz(tmp_path / "d.npz")
    calls = []
    meta = {"arch": "tiny", "form": "deploy"}
    import cfws_jax.io

    class FakeModel:
        def __init__(self, deploy):
            self.deploy = deploy

        def apply(self, variables, x, **kw):
            calls.append((self.deploy, kw))
            assert isinstance(variables["params"]["w"], jax.core.Tracer)  # passed, not baked in
            return gather_model(x)

    monkeypatch.setattr(cfws_jax.io, "load_variables", lambda d: ({"params": {"w": np.zeros(1)}}, dict(meta)))
    monkeypatch.setattr(cfws_jax.models, "create_model", lambda arch, deploy=False, num_classes=None: FakeModel(deploy))
    argv = ["eval", "--arch", "tiny", "--params", str(tmp_path), "--data", str(data), "--json", "--no-progress"]
    rc, out, _ = run_cli(argv, capsys)
    top1, top5, n = ref_from_npz(data, None)
    doc = json.loads(out.splitlines()[-1])
    assert rc == 0 and doc.pop("devices") == [str(d) for d in jax.local_devices()]
    assert doc == {"top1": top1, "top5": top5, "images": n, "subset": f"all {n} val images"}
    assert calls[0] == (True, {})
    meta["form"] = "train"
    rc, out, _ = run_cli(argv, capsys)
    assert rc == 0 and calls[-1] == (False, {"train": False})
    meta["arch"] = "other_arch"
    rc, out, err = run_cli(argv, capsys)
    assert rc == 1 and "'tiny'" in err and "'other_arch'" in err and str(tmp_path) in err


def test_eval_command_quantized_path(tmp_path, capsys, monkeypatch):
    import cfws_jax.ptq

    data = make_npz(tmp_path / "d.npz")
    qmodel = types.SimpleNamespace(arch="tiny")
    monkeypatch.setattr(cfws_jax.ptq, "load_quantized", lambda d: qmodel, raising=False)
    monkeypatch.setattr(cfws_jax.ptq, "quantized_apply_fn", lambda q: gather_model, raising=False)
    argv = ["eval", "--arch", "tiny", "--quantized", str(tmp_path), "--data", str(data), "--json", "--no-progress"]
    rc, out, _ = run_cli(argv, capsys)
    top1, top5, n = ref_from_npz(data, None)
    doc = json.loads(out.splitlines()[-1])
    assert rc == 0 and doc.pop("devices") == [str(d) for d in jax.local_devices()]
    assert doc == {"top1": top1, "top5": top5, "images": n, "subset": f"all {n} val images"}
    qmodel.arch = "repvgg_a0"
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "disagrees" in err and "repvgg_a0" in err


def test_eval_command_errors(tmp_path, capsys):
    rc, _, err = run_cli(["eval", "--arch", "x", "--params", "p", "--data", str(tmp_path / "none")], capsys)
    assert rc == 1 and "none" in err and "does not exist" in err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--arch", "x", "--params", "p", "--quantized", "q", "--data", "d"])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--arch", "x", "--data", "d"])
