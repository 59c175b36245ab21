"""A dependency-free progress bar for long loops (calibration, evaluation, training).

Writes to stderr; redraws in place on a terminal and prints a line every ~10% otherwise,
so CI logs stay short. ``disable=True`` (or ``CFWS_JAX_NO_PROGRESS=1``) silences it.
"""

from __future__ import annotations

import os
import sys
import time


class Progress:
    """``for x in Progress(it, total=n, desc="calib", unit="img"): ...``; ``bar.update(k)``."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool | None = None, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.disable = bool(os.environ.get("CFWS_JAX_NO_PROGRESS")) if disable is None else disable
        self.n = 0
        self.start = time.perf_counter()
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last_decile = -1
        self.postfix = ""

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self.start
        return self.n / dt if dt > 0 else 0.0

    def set_postfix(self, text: str) -> None:
        self.postfix = text

    def _line(self) -> str:
        el = time.perf_counter() - self.start
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
            head = f"{self.desc}: [{bar}] {self.n}/{self.total}"
        else:
            head = f"{self.desc}: {self.n}"
        tail = f" {self.postfix}" if self.postfix else ""
        return f"{head} {self.rate:.1f} {self.unit}/s {el:.1f}s{tail}"

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.disable:
            return
        if self._tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
        elif self.total:
            dec = int(10 * self.n / self.total)
            if dec != self._last_decile:
                self._last_decile = dec
                self.stream.write(self._line() + "\n")

    def close(self) -> None:
        already_final = not self._tty and self.total and self.n >= self.total and self._last_decile >= 10
        if not self.disable and not already_final:
            self.stream.write(("\r" if self._tty else "") + self._line() + "\n")
            self.stream.flush()
        self.disable = True

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
