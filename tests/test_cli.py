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
    import jax

    assert main(["version"]) == 0
    out = capsys.readouterr().out
    n = len(jax.devices())
    assert f"cfws-jax {cfws_jax.__version__}" in out
    assert f"backend: {jax.default_backend()}, {n} device{'s' if n != 1 else ''}: " in out


def test_device_summary_names_platform_count_and_kinds():
    from cfws_jax.commands.version import device_summary

    class Dev:
        def __init__(self, i, kind, platform="gpu"):
            self.id, self.device_kind, self.platform = i, kind, platform

        def __str__(self):
            return f"cuda:{self.id}"

    devs = [Dev(0, "NVIDIA H100 80GB HBM3"), Dev(1, "NVIDIA H100 80GB HBM3"), Dev(2, "NVIDIA H200")]
    assert device_summary(devs, "gpu") == ("backend: gpu, 3 devices: NVIDIA H100 80GB HBM3 x2, NVIDIA H200 "
                                           "(cuda:0, cuda:1, cuda:2)")
    assert device_summary(devs[:1], "gpu") == "backend: gpu, 1 device: NVIDIA H100 80GB HBM3 (cuda:0)"


def test_cuda_extra_installs_gpu_jax_of_the_pinned_release():
    """``pip install -e '.[cuda]' -c constraints.txt``: jax's CUDA 13 extra, whose plugin the
    constraints pin to the jax release they pin."""
    import pathlib
    import re
    import tomllib

    root = pathlib.Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cuda"] == ["jax[cuda13]"]
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (root / "constraints.txt").read_text(), re.M))
    assert pins["jax-cuda13-plugin"] == pins["jax-cuda13-pjrt"] == pins["jax"] == pins["jaxlib"]
    assert "nvidia-cudnn-cu13" in pins and not any(k.endswith("-cu12") for k in pins)


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
