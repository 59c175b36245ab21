"""The cfws-jax entry point: help, version, and the installed console script."""

from __future__ import annotations

import subprocess
import sys

import pytest

import cfws_jax
from cfws_jax.cli import main


def test_help_lists_every_subcommand(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("convert", "ptq", "eval", "demo", "version"):
        assert cmd in out


def test_version_names_package_and_backend(capsys):
    assert main(["version"]) == 0
    out = capsys.readouterr().out
    assert f"cfws-jax {cfws_jax.__version__}" in out and "backend" in out


def test_unknown_subcommand_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["quantise"])
    assert e.value.code == 2


def test_console_script_runs():
    """This checkout's command (``python -m cfws_jax.cli`` with this interpreter), not whatever
    ``cfws-jax`` is first on PATH; the script in this interpreter's own bin folder too, if any."""
    from pathlib import Path

    r = subprocess.run([sys.executable, "-m", "cfws_jax.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ptq" in r.stdout
    r = subprocess.run([sys.executable, "-m", "cfws_jax.cli", "version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"cfws-jax {cfws_jax.__version__}" in r.stdout
    script = Path(sys.executable).with_name("cfws-jax")
    if script.exists():
        r = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and f"cfws-jax {cfws_jax.__version__}" in r.stdout
