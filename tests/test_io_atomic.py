"""Writers never lose data: temporary sibling + atomic rename, a manifest of the files written,
--overwrite removes only those, and a SIGKILL at any step leaves the old output or the new one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cfws_jax import io
from cfws_jax.io import (KILL_ENV, MANIFEST_KEY, META_FILE, OutputError, check_output_dir, check_output_file,
                         folder_kind, load_variables, save_variables, write_file_atomic)

REPO = Path(__file__).resolve().parents[1]


def _v(value: int) -> dict:
    return {"params": {"w": np.full((4, 3), value, np.int32), "b": np.arange(5, dtype=np.float32) * value}}


def _version_of(directory) -> int:
    """Which ``_v(k)`` the folder holds; fails unless it loads completely and exactly."""
    got, meta = load_variables(directory)
    k = meta["version"]
    want = _v(k)
    assert set(got["params"]) == set(want["params"])
    for name, arr in want["params"].items():
        assert got["params"][name].tobytes() == arr.tobytes()
    return k


def test_manifest_lists_every_written_file(tmp_path):
    out = save_variables(tmp_path / "c", _v(1), {"version": 1})
    doc = json.loads((tmp_path / "c" / META_FILE).read_text())
    on_disk = io._list_files(out)
    assert sorted(doc[MANIFEST_KEY] + [META_FILE]) == on_disk
    assert all(f.startswith("orbax/") for f in doc[MANIFEST_KEY])
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary sibling left behind
    assert folder_kind(out) == "variables" and folder_kind(tmp_path) is None


def test_overwrite_removes_only_what_it_wrote(tmp_path):
    d = tmp_path / "c"
    save_variables(d, _v(1), {"version": 1})
    (d / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"1 file\(s\) cfws_jax did not write \(notes\.txt\)"):
        save_variables(d, _v(2), {"version": 2}, overwrite=True)
    assert (d / "notes.txt").read_text() == "mine" and _version_of(d) == 1
    (d / "notes.txt").unlink()
    (d / "orbax" / "extra.bin").write_bytes(b"x")  # hidden inside the library's own sub-folder
    with pytest.raises(OutputError, match="orbax/extra.bin"):
        save_variables(d, _v(2), {"version": 2}, overwrite=True)
    (d / "orbax" / "extra.bin").unlink()
    (d / "sub").mkdir()  # an empty foreign folder counts too
    with pytest.raises(OutputError, match="sub/"):
        save_variables(d, _v(2), {"version": 2}, overwrite=True)
    (d / "sub").rmdir()
    save_variables(d, _v(2), {"version": 2}, overwrite=True)
    assert _version_of(d) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_legacy_checkpoint_without_manifest(tmp_path):
    d = tmp_path / "c"
    save_variables(d, _v(1), {"version": 1})
    doc = json.loads((d / META_FILE).read_text())
    del doc[MANIFEST_KEY]
    (d / META_FILE).write_text(json.dumps(doc))
    save_variables(d, _v(2), {"version": 2}, overwrite=True)  # owns cfws_jax.json + orbax/
    assert _version_of(d) == 2


def test_bad_output_paths(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="--out .*file exists and is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputError, match="Not a directory"):
        check_output_dir(tmp_path / "file" / "sub")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(OutputError, match="symbolic link"):
        save_variables(tmp_path / "link", _v(1), {})
    assert not any((tmp_path / "real").iterdir())
    with pytest.raises(OutputError, match="symbolic link"):
        check_output_file(tmp_path / "link", flag="--report")
    with pytest.raises(OutputError, match="--report .*already exists .*--overwrite"):
        check_output_file(tmp_path / "file", flag="--report")
    with pytest.raises(OutputError, match=r"use a \.json or \.csv"):
        check_output_file(tmp_path / "r.txt", suffixes=(".json", ".csv"))
    assert check_output_dir(tmp_path / "new" / "deeper") == str(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # validation writes nothing
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="permission denied"):
                check_output_dir(ro / "out")
        finally:
            ro.chmod(0o700)


def test_write_file_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_file_atomic(p, "{}\n")
    with pytest.raises(OutputError, match="already exists"):
        write_file_atomic(p, "x")
    write_file_atomic(p, b"[1]\n", overwrite=True)
    assert p.read_text() == "[1]\n" and [f.name for f in tmp_path.iterdir()] == ["r.json"]


_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from cfws_jax import io
    target, version, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if mode == "no_exchange":
        io._exchange = lambda a, b: False
    if mode == "file":
        io.write_file_atomic(target, f"version {version}\\n" * 1000, overwrite=True)
    else:
        v = {"params": {"w": np.full((4, 3), version, np.int32), "b": np.arange(5, dtype=np.float32) * version}}
        io.save_variables(target, v, {"version": version}, overwrite=True)
    print("finished")
""")


def _write(target, version: int, kill_at: str | None = None, mode: str = "dir") -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    r = subprocess.run([sys.executable, "-c", _WRITER, str(target), str(version), mode], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, -signal.SIGKILL), r.stderr
    return r.returncode


def _loading_folders(root: Path) -> dict[str, int]:
    """Every folder under ``root`` that loads, with the version it holds (complete and exact)."""
    found = {}
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        if (d / META_FILE).is_file():
            found[d.name] = _version_of(d)
    return found


@pytest.mark.parametrize("kill_at,expect", [
    ("tmp_created", 1), ("orbax_written", 1), ("meta_written", 1), ("swapped", 2), ("committed", 2), (None, 2),
])
def test_sigkill_while_overwriting_leaves_old_or_new(tmp_path, kill_at, expect):
    target = tmp_path / "model"
    save_variables(target, _v(1), {"version": 1})
    rc = _write(target, 2, kill_at)
    assert rc == (0 if kill_at is None else -signal.SIGKILL)
    assert _version_of(target) == expect
    # whatever else is left (a hidden temporary folder) either does not load or is complete
    assert set(_loading_folders(tmp_path).values()) <= {1, 2}
    save_variables(target, _v(3), {"version": 3}, overwrite=True)  # and the next --overwrite works
    assert _version_of(target) == 3


def test_sigkill_on_first_write_and_without_atomic_exchange(tmp_path):
    target = tmp_path / "model"
    assert _write(target, 1, "meta_written") == -signal.SIGKILL
    assert not target.exists()  # nothing at the path: never a half-written folder there
    assert _write(target, 1, "renamed") == -signal.SIGKILL
    assert _version_of(target) == 1
    # no RENAME_EXCHANGE (other file systems): killed between the two renames, the old model
    # survives intact under a hidden name that the error message points to
    assert _write(target, 2, "parked", mode="no_exchange") == -signal.SIGKILL
    with pytest.raises(FileNotFoundError, match=r"interrupted --overwrite left the old one at .*\.model\.cfws-old-"):
        load_variables(target)
    held = _loading_folders(tmp_path)  # the parked old one, and the complete new one not yet renamed
    assert {1, 2} == set(held.values()) and "model" not in held
    assert _write(target, 2, None, mode="no_exchange") == 0
    assert _version_of(target) == 2


@pytest.mark.parametrize("kill_at,expect", [("file_written", "1"), ("file_replaced", "2")])
def test_sigkill_while_writing_a_file(tmp_path, kill_at, expect):
    target = tmp_path / "report.json"
    target.write_text("version 1\n" * 1000)
    assert _write(target, 2, kill_at, mode="file") == -signal.SIGKILL
    assert target.read_text() == f"version {expect}\n" * 1000
