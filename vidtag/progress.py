"""Progress for every step that can take more than a few seconds: a bar in a terminal, status lines in logs.

When stderr is a terminal, a tqdm bar. Otherwise (DVC stage logs, CI, ``nohup``, a pipe) no bar, whose
carriage returns make logs unreadable, but one line every ``interval`` seconds and a final line::

    extract: 5120/20480 frame (85.3 frame/s, 1:00, ETA 3:00)
    extract: 20480/20480 frame (84.9 frame/s, 4:01, done)

The interval is the ``interval`` argument, else the ``VIDTAG_PROGRESS_S`` environment variable, else 30 s
(0 prints a line on every update). ``enabled=False`` prints nothing at all.

    for batch in progress(loader, total=len(loader), desc="train", unit="batch"):
        ...

    with Progress(total=n, desc="extract", unit="frame") as p:
        for rows in ...:
            p.update(len(rows))
            p.write("bad frame ...")   # a message that does not break the bar
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

T = TypeVar("T")

ENV_INTERVAL = "VIDTAG_PROGRESS_S"
DEFAULT_INTERVAL = 30.0


def _interval(interval: float | None) -> float:
    if interval is not None:
        return max(0.0, float(interval))
    raw = os.environ.get(ENV_INTERVAL, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        warnings.warn(f"{ENV_INTERVAL}={raw!r} is not a number of seconds >= 0; using {DEFAULT_INTERVAL:g}",
                      stacklevel=3)
        return DEFAULT_INTERVAL
    return value


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def clock(seconds: float) -> str:
    """Seconds as h:mm:ss (or m:ss under an hour), for status lines and ETAs."""
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts work done; shows it as a bar (terminal), periodic lines (logs) or not at all.

    Use as a context manager (or call ``close()``) so the final line is printed and the bar closed.
    """

    def __init__(self, total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True,
                 interval: float | None = None, file: IO[str] | None = None, leave: bool = True):
        self.total = None if total is None else int(total)
        self.desc = desc
        self.unit = unit
        self.n = 0
        self.file = sys.stderr if file is None else file  # looked up now, so redirected stderr is honoured
        self.interval = _interval(interval)
        self.mode = "off" if not enabled else "bar" if _isatty(self.file) else "log"
        self._start = time.monotonic()
        self._last = self._start
        self._end: float | None = None  # set by close(): the final status keeps its elapsed time
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc or None, unit=unit, file=self.file, leave=leave,
                             dynamic_ncols=True)

    # -- counting

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log":
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                self._print(self.status(now))

    def write(self, message: str) -> None:
        """Print a message (to the same stream) without breaking the bar; printed even when disabled."""
        if self._bar is not None:
            self._bar.write(message, file=self.file)
        else:
            self._print(message)

    def status(self, now: float | None = None, final: bool = False) -> str:
        """``desc: n/total unit (rate/s, elapsed, ETA)``; the final line ends in ``done`` or ``stopped``."""
        if now is None:
            now = self._end if self._end is not None else time.monotonic()
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        if rate >= 1 or rate == 0:
            speed = f"{rate:.1f} {self.unit}/s"
        else:
            speed = f"{1 / rate:.1f} s/{self.unit}"
        parts = [speed, clock(elapsed)]
        if final:
            parts.append("done" if self.total is None or self.n >= self.total else "stopped")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {clock(max(0, self.total - self.n) / rate)}")
        prefix = f"{self.desc}: " if self.desc else ""
        return f"{prefix}{count} {self.unit} ({', '.join(parts)})"

    def close(self) -> None:
        if self._end is not None:
            return
        self._end = time.monotonic()
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "log":
            self._print(self.status(final=True))

    def _print(self, line: str) -> None:
        try:
            print(line, file=self.file, flush=True)
        except (ValueError, OSError):  # stream closed under us: progress must never kill the work
            pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", *,
             enabled: bool = True, interval: float | None = None, file: IO[str] | None = None,
             leave: bool = True) -> Iterator[T]:
    """Yield from ``iterable``, counting one ``unit`` per item (``total`` defaults to ``len(iterable)``)."""
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except (TypeError, AttributeError):
            total = None
    with Progress(total, desc, unit, enabled=enabled, interval=interval, file=file, leave=leave) as p:
        for item in iterable:
            yield item
            p.update(1)
