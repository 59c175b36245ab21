"""Progress bars for long loops (calibration, evaluation, training), drawn by ``tqdm``.

``Progress`` keeps the small interface the rest of the package uses (``update``,
``set_postfix(text)``, ``close``, iteration, ``with``) and shows count, rate (``img/s``) and
ETA. It writes to stderr; on a terminal tqdm redraws in place, otherwise one plain line is
printed every ~10% (and at the end), so CI logs stay short. ``disable=True`` (or
``CFWS_JAX_NO_PROGRESS=1``) silences it.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class _Lines:
    """File wrapper for non-terminals: each tqdm redraw (``"\\r" + status``) becomes one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            part = part.rstrip()
            if part:
                self.stream.write(part + "\n")

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


class Progress:
    """``for x in Progress(it, total=n, desc="calib", unit="img"): ...``; ``bar.update(k)``."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 disable: bool | None = None, stream=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        stream = stream or sys.stderr
        self.disable = bool(os.environ.get("CFWS_JAX_NO_PROGRESS")) if disable is None else bool(disable)
        self._tty = hasattr(stream, "isatty") and stream.isatty()
        self._last_decile = 0  # tqdm prints the 0% line on creation
        self._bar = tqdm(total=total, desc=desc, unit=unit, disable=self.disable, leave=True, dynamic_ncols=True,
                         file=stream if self._tty else _Lines(stream), ascii=not self._tty,
                         mininterval=0.2 if self._tty else float("inf"), miniters=1 if self._tty else None)

    @property
    def n(self) -> int:
        return self._bar.n

    @property
    def rate(self) -> float:
        """Items per second since the start."""
        el = self._bar.format_dict["elapsed"]
        return self.n / el if el > 0 else 0.0

    def set_postfix(self, text: str) -> None:
        self._bar.set_postfix_str(str(text), refresh=False)

    def update(self, k: int = 1) -> None:
        self._bar.update(k)
        if self.disable or self._tty or not self.total:
            return
        dec = int(10 * self.n / self.total)
        if dec != self._last_decile:
            self._last_decile = dec
            self._bar.refresh()

    def close(self) -> None:
        if not self._bar.disable:
            final_shown = not self._tty and self.total and self._last_decile >= 10
            if final_shown:  # the 100% line is already out: do not print it twice
                self._bar.leave = False
            elif not self._tty:
                self._bar.refresh()
                self._bar.leave = False
        self._bar.close()
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
