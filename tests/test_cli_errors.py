"""Every bad input through the command line: exit code 1, one stderr line
``cfws-jax CMD: error: ...`` naming the file / flag / key, never a traceback; output paths are
checked before any work."""

from __future__ import annotations

import io as _io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from cfws_jax.cli import error_line, main
from cfws_jax.io import save_variables

REPO = Path(__file__).resolve().parents[1]


def _png(width: int, height: int, payload: bytes = b"\0" * 64, color_type: int = 0) -> bytes:
    """A small PNG whose header declares ``width x height`` 8-bit pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload, 9))
            + chunk(b"IEND", b""))


def _npz_declaring(path: Path, shape) -> None:
    """An .npz whose x_train header declares ``shape`` uint8 but holds a few bytes."""
    buf = _io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x_train.npy", buf.getvalue() + b"\0" * 16)
        zf.writestr("y_train.npy", _npy(np.zeros(4, np.int64)))
        zf.writestr("x_test.npy", _npy(np.zeros((4, 8, 8, 3), np.uint8)))
        zf.writestr("y_test.npy", _npy(np.zeros(4, np.int64)))


def _npy(a) -> bytes:
    buf = _io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Float params, a (fake) quantized folder, data folders and files for the cases."""
    from cfws_jax.models import create_model
    from conftest import numpy_init

    root = tmp_path_factory.mktemp("bad")
    params = root / "params"
    save_variables(params, numpy_init(create_model("repvgg_cifar_small"), (1, 32, 32, 3), seed=1, train=False),
                   {"arch": "repvgg_cifar_small", "form": "train"})
    qdir = root / "qfake"  # only its cfws_jax.json matters for the folder-kind check
    save_variables(qdir, {"layers": {"w": np.zeros(2, np.int8)}}, {"kind": "quantized_model",
                                                                     "arch": "repvgg_cifar_small"})
    rng = np.random.default_rng(0)
    np.savez(root / "tiny.npz", x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, 8), x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 8))
    for name, (w, h) in {"bomb": (30000, 30000), "forged": (5000, 5000), "cap": (9000, 9000)}.items():
        d = root / name / "cls0"
        d.mkdir(parents=True)
        (d / f"{name}.png").write_bytes(_png(w, h))
    assert len((root / "bomb" / "cls0" / "bomb.png").read_bytes()) < 500
    _npz_declaring(root / "huge.npz", (1_000_000, 256, 256, 3))  # 196 GB declared
    (root / "afile").write_text("x")
    (root / "real").mkdir()
    (root / "rdir.json").mkdir()
    os.symlink(root / "real", root / "link")
    os.symlink(root / "afile", root / "rlink.json")
    foreign = root / "foreign"
    save_variables(foreign, {"w": np.zeros(1)}, {})
    (foreign / "mine.txt").write_text("keep")
    return root


def _ptq(world, *extra, out=None, params=None, data=None):
    return ["ptq", "--arch", "repvgg_cifar_small", "--params", str(params or world / "params"),
            "--calib-data", str(data or world / "tiny.npz"), "--num-calib", "4", "--no-progress",
            "--out", str(out or world / "q_new"), *extra]


def _cases(w):
    """(argv, text the one error line must contain)."""
    long_name = "n" * 300
    return {
        "ptq --out symlink": (_ptq(w, out=w / "link", params=w / "missing"), "--out"),
        "ptq --out is a file": (_ptq(w, out=w / "afile", params=w / "missing"), "is a file"),
        "ptq --out non-empty foreign": (_ptq(w, "--overwrite", out=w / "foreign"), "mine.txt"),
        "ptq --out exists, no --overwrite": (_ptq(w, out=w / "params", params=w / "missing"), "--overwrite"),
        "ptq --out under a file": (_ptq(w, out=w / "afile" / "q", params=w / "missing"), "Not a directory"),
        "ptq --out name too long": (_ptq(w, out=w / long_name, params=w / "missing"), "--out"),
        "ptq --report extension": (_ptq(w, "--report", str(w / "r.txt"), params=w / "missing"), "--report"),
        "ptq --report is a folder": (_ptq(w, "--report", str(w / "rdir.json"), params=w / "missing"),
                                     "is not a regular file"),
        "ptq --report symlink": (_ptq(w, "--report", str(w / "rlink.json"), params=w / "missing"), "symbolic link"),
        "ptq --report inside --out": (_ptq(w, "--report", str(w / "q_new" / "r.json"), params=w / "missing"),
                                      "inside --out"),
        "ptq --report exists": (_ptq(w, "--report", str(w / "afile.json"), params=w / "missing"), "afile.json"),
        "ptq --num-calib 0": (_ptq(w, "--num-calib", "0"), "--num-calib"),
        "ptq --num-calib too many": (_ptq(w, "--num-calib", "100"), "--num-calib 100"),
        "ptq --w-bits 1": (_ptq(w, "--w-bits", "1"), "--w-bits"),
        "ptq --params quantized folder": (_ptq(w, params=w / "qfake"), "--quantized"),
        "ptq --params a file": (_ptq(w, params=w / "tiny.npz"), "cfws-jax convert"),
        "ptq --params missing": (_ptq(w, params=w / "nope"), "nope"),
        "ptq --params shipped typo": (_ptq(w, params="shipped:nope"), "shipped:repvgg_a0_cifar"),
        "ptq decompression bomb": (_ptq(w, "--num-calib", "1", "--calib-split", "val", data=w / "bomb"), "bomb.png"),
        "ptq forged png size": (_ptq(w, "--num-calib", "1", "--calib-split", "val", data=w / "forged"),
                                "forged.png: PNG declares 5000x5000"),
        "ptq png above pixel cap": (_ptq(w, "--num-calib", "1", "--calib-split", "val", data=w / "cap"),
                                    "cap.png: image declares 9000x9000"),
        "ptq npz declaring 196 GB": (_ptq(w, data=w / "huge.npz"), "huge.npz: member x_train declares"),
        "eval --params quantized": (["eval", "--arch", "repvgg_cifar_small", "--params", str(w / "qfake"), "--data",
                                     str(w / "tiny.npz"), "--no-progress"], "--quantized"),
        "eval --quantized float": (["eval", "--arch", "repvgg_cifar_small", "--quantized", str(w / "params"),
                                    "--data", str(w / "tiny.npz"), "--no-progress"], "--params"),
        "eval --batch-size 0": (["eval", "--arch", "repvgg_cifar_small", "--params", str(w / "params"), "--data",
                                 str(w / "tiny.npz"), "--batch-size", "0"], "--batch-size"),
        "eval --data name too long": (["eval", "--arch", "repvgg_cifar_small", "--params", str(w / "params"),
                                       "--data", str(w / long_name), "--no-progress"], "too long"),
        "eval bomb png": (["eval", "--arch", "repvgg_cifar_small", "--params", str(w / "params"), "--data",
                           str(w / "bomb"), "--no-progress"], "bomb.png"),
        "convert --out is a file": (["convert", "--checkpoint", str(w / "nope.pth"), "--out", str(w / "afile")],
                                    "--out"),
        "convert --out symlink": (["convert", "--checkpoint", str(w / "nope.pth"), "--out", str(w / "link")],
                                  "symbolic link"),
    }


CASE_NAMES = list(_cases(Path("/x")))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line(world, case, capsys):
    (world / "afile.json").write_text("{}")
    argv, needle = _cases(world)[case]
    before = sorted(p.name for p in world.iterdir())
    assert main(argv) == 1
    err = capsys.readouterr().err
    cmd = argv[0]
    lines = [line for line in err.strip().splitlines() if not line.startswith(("calibration data:", "data:", "devices:"))]
    assert len(lines) == 1, err  # the progress lines (--no-progress) and info lines aside: one error line
    assert lines[0].startswith(f"cfws-jax {cmd}: error: ") and "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert len(lines[0]) < 2200
    assert sorted(p.name for p in world.iterdir()) == before  # nothing written, nothing removed
    assert (world / "foreign" / "mine.txt").read_text() == "keep"


def test_wrong_arch_prints_a_summary(tmp_path, capsys):
    """An A0 checkpoint converted with --arch repvgg_a1: counts, a few keys, and the fitting arch."""
    from converters.convert import key_table

    table = key_table("repvgg_a0", "train", "dingxiaoh")
    np.savez(tmp_path / "a0.npz", **{k: np.zeros(shape, np.float32) + 0.5 for k, (_, shape) in table.items()})
    assert main(["convert", "--checkpoint", str(tmp_path / "a0.npz"), "--arch", "repvgg_a1",
                 "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 1500, len(err)
    assert "shape mismatches (" in err and "pass --arch repvgg_a0" in err and ", ..." in err
    assert not (tmp_path / "o").exists()


def test_error_line_kinds():
    assert error_line(MemoryError()).startswith("out of memory")
    assert error_line(OverflowError("int too large")) == "number too large: int too large"
    assert error_line(PermissionError(13, "Permission denied", "/x/y")) == "/x/y: Permission denied"
    assert error_line(ValueError("a\nb")) == "a b"
    long = error_line(ValueError("k" * 10000))
    assert len(long) < 2100 and "more characters" in long


def test_unknown_errors_keep_their_traceback(monkeypatch):
    """Only the documented types are caught: a bug is not dressed up as a user error."""
    import cfws_jax.commands.version as version

    monkeypatch.setattr(version, "run", lambda args: (_ for _ in ()).throw(TypeError("bug")))
    with pytest.raises(TypeError):
        main(["version"])


def test_version_flag_and_subprocess_error(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "cfws_jax.cli", "--version"], capture_output=True, text=True,
                       timeout=60, env=env)
    assert r.returncode == 0 and r.stdout.startswith("cfws-jax ")
    (tmp_path / "f").write_text("x")
    r = subprocess.run([sys.executable, "-m", "cfws_jax.cli", "convert", "--checkpoint", "x.pth", "--out",
                        str(tmp_path / "f")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"cfws-jax convert: error: --out {tmp_path / 'f'} exists and is a file, "
                                             "not a folder"]
