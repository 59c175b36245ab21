"""examples/compare_scenes_run.py: a rerun folder holding the shipped model and log compares
equal; one weight changed by one ULP, one logged figure, or a missing file is reported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
cmp = load_script(ROOT / "examples" / "compare_scenes_run.py")


def _run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir(parents=True)
    shutil.copy(cmp.SHIPPED, run / "final.npz")
    shutil.copy(cmp.SHIPPED_LOG, run / "log.json")
    return run


def test_the_shipped_files_reproduce_themselves(tmp_path, capsys):
    assert cmp.main([str(_run_dir(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "byte-identical" in out and "the run reproduces the shipped model" in out


def test_one_ulp_or_one_logged_figure_is_a_difference(tmp_path, capsys):
    run = _run_dir(tmp_path)
    with np.load(run / "final.npz") as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k, a in arrays.items() if a.dtype == np.float32 and a.size)
    flat = arrays[key].reshape(-1).copy()
    flat[0] = np.nextafter(flat[0], np.float32(np.inf))
    arrays[key] = flat.reshape(arrays[key].shape)
    np.savez(run / "final.npz", **arrays)
    assert cmp.main([str(run)]) == 1
    assert f"{len(arrays) - 1} of {len(arrays)} byte-identical" in capsys.readouterr().out
    run = _run_dir(tmp_path / "b")
    log = json.loads((run / "log.json").read_text())
    log["history"][5]["cls"] += 1e-5
    (run / "log.json").write_text(json.dumps(log))
    assert cmp.main([str(run)]) == 1
    assert f"{len(log['history']) - 1} of {len(log['history'])} with every logged figure equal" in capsys.readouterr().out


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert cmp.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "final.npz not found" in err[0]
