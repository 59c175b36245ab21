"""The progress bar (tqdm): short logs off a terminal, rate and ETA, silent when disabled."""

from __future__ import annotations

import io

from cfws_jax.progress import Progress


def test_non_terminal_output_prints_each_decile_once():
    out = io.StringIO()
    assert list(Progress(range(50), desc="calib", unit="img", stream=out)) == list(range(50))
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 11
    assert lines[-1].startswith("calib: 100%") and "50/50" in lines[-1] and "img/s" in lines[-1]
    assert sum("50/50" in line for line in lines) == 1
    assert "\r" not in out.getvalue()


def test_rate_and_eta_are_shown():
    out = io.StringIO()
    bar = Progress(total=10, desc="eval", unit="img", stream=out)
    bar.update(5)
    bar.close()
    half = [line for line in out.getvalue().splitlines() if "5/10" in line][0]
    assert "img/s" in half and "<" in half  # "[elapsed<remaining, rate]"
    assert bar.rate > 0 and bar.n == 5


def test_disabled_and_environment_switch(monkeypatch):
    out = io.StringIO()
    with Progress(total=3, stream=out, disable=True) as bar:
        bar.update(3)
    monkeypatch.setenv("CFWS_JAX_NO_PROGRESS", "1")
    with Progress(total=3, stream=out) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_postfix_and_unknown_total():
    out = io.StringIO()
    bar = Progress(total=None, desc="train", stream=out)
    bar.set_postfix("loss 0.5")
    bar.update(2)
    bar.close()
    assert "train: 2" in out.getvalue() and "loss 0.5" in out.getvalue()
