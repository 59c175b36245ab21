"""Smoke run of the fuzz harnesses (fuzz/): every target for a short, fixed budget with the
Hypothesis engine (no native code; each run first replays the seeds and the minimized past
findings ``fuzz/regressions/`` under the memory limit), and the harness contract itself (a planted
undocumented exception is a finding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("hypothesis")

from fuzz import run as fuzz_run  # noqa: E402
from fuzz.targets import TARGETS, Finding, Target, run_one, scratch_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "fuzz" / "regressions"
SMOKE_SECONDS = 1.5  # per target: ~20 s for all of them with process start-up


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "fuzz" / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_reader_has_a_harness_and_seeds():
    assert set(TARGETS) == {"torch_zip", "torch_legacy", "yolov6_release", "safetensors", "npz_checkpoint",
                            "npz_split", "image_folder", "coco_json"}
    total = 0
    for name in TARGETS:
        seeds = list((ROOT / "fuzz" / "corpus" / name).iterdir())
        assert len(seeds) >= 4, name
        total += sum(p.stat().st_size for p in seeds)
    assert total < 2 * 2 ** 20


def test_smoke_all_targets(tmp_path):
    out = _run("--engine", "hypothesis", "--seconds", str(SMOKE_SECONDS), "--json", str(tmp_path / "s.json"),
               "--findings", str(tmp_path / "findings"), "--workdir", str(tmp_path / "corpus"), timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    rows = {r["target"]: r for r in json.loads((tmp_path / "s.json").read_text())}
    assert set(rows) == set(TARGETS)
    for name, row in rows.items():
        assert row["runs"] >= 10 and not row["findings"], (name, row)  # every seed replayed at least


FIXED = {  # fuzz/regressions/<target>/<file>: the one-line refusal each finding now gets
    "coco_json/list-image-id": r"annotations\[0\] refers to image id \[1\]",
    "image_folder/png-idat-declares-2gib": r"cannot decode image .*input\.png: broken data stream",
    "image_folder/tiff-4x4194306-resize-blowup": r"input\.png: image of 4x4194306 pixels would be resized to 18x18874377",
    "image_folder/tiff-strip-offset-bytes": r"cannot decode image .*input\.png: malformed tag \('bytes' object",
    "image_folder/tiff-strip-offset-float": r"cannot decode image .*input\.png: malformed tag \('float' object",
    "image_folder/tiff-strip-offset-rational": r"cannot decode image .*input\.png: malformed tag \('IFDRational' object",
    "npz_checkpoint/bytearray8-declares-85tb": r"BYTEARRAY8 declares 85,471,651,392,660 bytes but the pickle holds 71",
    "npz_split/corrupt-deflate-zlib-error": r"not a readable \.npz file \(error: Error -3 while decompressing",
    "npz_split/is-zipfile-raises-badzipfile": r"not a readable \.npz file \(BadZipFile: zipfiles that span",
    "torch_legacy/bytearray8-declares-8eb": r"BYTEARRAY8 declares 8,246,090,917,716,449,320 bytes",
}


@pytest.mark.parametrize("name", sorted(FIXED))
def test_findings_stay_fixed(name):
    """Each minimized finding is refused with its clean line (the smoke run also replays them all
    under the memory limit, where the image and BYTEARRAY8 ones used to fail)."""
    target, path = TARGETS[name.split("/")[0]], REGRESSIONS / name
    wd = scratch_dir()
    with pytest.raises(target.refusals, match=FIXED[name]):
        target.call(target.place(path.read_bytes(), wd))
    assert run_one(target, path.read_bytes(), wd, alarm_s=10) is False


def test_every_finding_has_a_regression_test():
    assert {f"{d.name}/{p.name}" for d in REGRESSIONS.iterdir() for p in d.iterdir()} == set(FIXED)


def test_undocumented_exception_is_a_finding(tmp_path, monkeypatch):
    """Plant a bug (the JSON parser raising KeyError on some inputs): the Hypothesis engine must
    report it, with the failing input saved."""
    import cfws_jax.data.coco as coco

    def loads(text):
        if not text.startswith("{"):
            raise KeyError("planted")
        return __import__("json").loads(text)

    monkeypatch.setattr(coco, "json", types.SimpleNamespace(loads=loads, JSONDecodeError=ValueError))
    status = fuzz_run.fuzz_with_hypothesis(TARGETS["coco_json"], fuzz_run._seeds("coco_json"), 20,
                                           findings_dir=tmp_path)
    assert status["findings"] and status["findings"][0].startswith("KeyError"), status
    assert len(list(tmp_path.iterdir())) == 1


def test_refusal_contract(tmp_path):
    """A documented error is clean only as one line naming the file, not hiding a MemoryError."""
    def raiser(msg):
        def call(path):
            raise ValueError(msg.format(path=path))
        return Target("t", call, (ValueError,), lambda data, wd: wd / "f.bin", "test")

    wd = scratch_dir()
    assert run_one(raiser("{path}: bad"), b"", wd) is False
    for msg in ("{path}: two\nlines", "no file named", "{path}: out of memory while reading (MemoryError)"):
        with pytest.raises(Finding):
            run_one(raiser(msg), b"", wd)
    with pytest.raises(KeyError):
        run_one(Target("t", lambda p: {}["k"], (ValueError,), lambda d, w: w / "f", "test"), b"", wd)


def test_mutate_is_deterministic_and_bounded():
    seed = bytes(range(32))
    ops = [("flip", 3, b""), ("insert", 40, b"ab"), ("delete", 5, b""), ("repeat", 2, b"x"), ("truncate", 30, b"")]
    assert fuzz_run.mutate(seed, ops) == fuzz_run.mutate(seed, ops)
    assert len(fuzz_run.mutate(seed, [("truncate", 0, b"")])) == 0


def test_libfuzzer_output_parsing():
    text = ("#4096\tpulse  cov: 9 ft: 12 corp: 3/3b\nSlow unit: 11 s:\nartifact_prefix='f/t-'; Test unit written "
            "to f/t-slow-unit-ab\n==1== ERROR: libFuzzer: fuzz target exited\nartifact_prefix='f/t-'; Test unit "
            "written to f/t-crash-cd\nstat::number_of_executed_units: 5000\n")
    stats = fuzz_run._parse_libfuzzer(text)
    assert stats == {"runs": 5000, "cov": 9, "ft": 12, "artifacts": ["f/t-crash-cd"], "slow_units": ["f/t-slow-unit-ab"]}


def test_atheris_engine_runs(tmp_path):
    pytest.importorskip("atheris")
    out = _run("--engine", "atheris", "--seconds", "1", "--target", "coco_json", "--json", str(tmp_path / "a.json"),
               "--findings", str(tmp_path / "findings"), "--workdir", str(tmp_path / "corpus"))
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    (row,) = json.loads((tmp_path / "a.json").read_text())
    assert row["runs"] > 100 and row["cov"] and not row["findings"], row
