"""examples/train_cifar.py: a tiny run learns, is deterministic, and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_cifar.py"


def _load_script():
    from conftest import load_script

    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Two easy classes (bright vs dark images) so that a few steps visibly learn."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("data")
    y = np.arange(128) % 2
    x = (rng.integers(0, 100, (128, 32, 32, 3)) + 150 * y[:, None, None, None]).astype(np.uint8)
    np.savez(d / "tiny.npz", x_train=x, y_train=y, x_test=x[:64], y_test=y[:64])
    return d / "tiny.npz"


def _run(mod, data, out, epochs=2):
    return mod.main(["--data", str(data), "--arch", "repvgg_cifar_small", "--epochs", str(epochs),
                     "--batch-size", "32", "--lr", "0.05", "--warmup-epochs", "0.5", "--ckpt-every", "1",
                     "--out", str(out)])


def test_training_learns_and_resumes_exactly(tiny_data, tmp_path):
    mod = _load_script()
    full = tmp_path / "full"
    assert _run(mod, tiny_data, full) == 0
    log = json.loads((full / "log.json").read_text())
    assert log["epochs"] == 2 and log["test_top1"] > 0.6 and log["seed"] == 0
    a = np.load(full / "final.npz")
    assert any(k.startswith("params/stage0/rbr_dense/conv/kernel") for k in a.files)
    assert any(k.startswith("batch_stats/") for k in a.files)
    # resume: start from the epoch-1 checkpoint of the first run
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "ckpt", resumed / "ckpt")
    assert _run(mod, tiny_data, resumed) == 0
    b = np.load(resumed / "final.npz")
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
