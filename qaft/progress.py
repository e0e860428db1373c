"""Progress lines for output without a terminal (a SLURM job's log file): what a long phase is doing and how far
along it is, as plain flushed lines on stdout, since a progress bar drawn with carriage returns is unreadable in
a file and GPTQ, perplexity windows or lm-eval would otherwise run for minutes without a word.

A phase (:class:`Phase`) says what it does when it starts, then ``what: 7/30 blocks, 1m12s, ETA 3m05s`` at most
every ``every_s`` seconds, and how long it took when it ends. The ETA assumes the remaining items cost what the
done ones cost on average. Off until :func:`configure` turns it on: the command-line tools do (on one process of
a multi-process run), a library call stays silent.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace


@dataclass
class _Settings:
    enabled: bool = False
    every_s: float = 30.0


_SETTINGS = _Settings()


def configure(enabled: bool, every_s: float = 30.0) -> None:
    """Turn progress lines on or off for this process; ``every_s``: the least time between two lines of a phase."""
    if not every_s >= 0:
        raise ValueError(f"progress every_s={every_s!r} must be a number >= 0")
    _SETTINGS.enabled, _SETTINGS.every_s = bool(enabled), float(every_s)


@contextlib.contextmanager
def reporting(enabled: bool, every_s: float = 30.0) -> Iterator[None]:
    """Progress lines on or off inside the block (a run of a command-line tool), as they were after it."""
    previous = replace(_SETTINGS)
    configure(enabled, every_s)
    try:
        yield
    finally:
        configure(previous.enabled, previous.every_s)


def enabled() -> bool:
    """Whether progress lines are printed in this process."""
    return _SETTINGS.enabled


def say(message: str) -> None:
    """One line, flushed at once (a log file shows it while the phase still runs)."""
    if _SETTINGS.enabled:
        print(message, flush=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``: short enough for a progress line."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Phase:
    """A phase of ``total`` items (``unit``: what an item is, plural) that reports as it goes.

    ``total`` may be an estimate (``about=True``): the line then says ``of about N``.
    """

    def __init__(self, what: str, total: int | None, unit: str, about: bool = False) -> None:
        self.what, self.total, self.unit, self.about = what, total, unit, about
        self.start = self.last = time.perf_counter()
        self.done = 0
        size = "" if total is None else f" ({'about ' if about else ''}{total} {unit})"
        say(f"{what}: started{size}")

    def step(self, n: int = 1) -> None:
        """``n`` more items done; prints a line when ``every_s`` has passed since the last one."""
        self.done += n
        now = time.perf_counter()
        if _SETTINGS.enabled and now - self.last >= _SETTINGS.every_s and self.done != self.total:
            self.last = now
            say(f"{self.what}: {self._count()}, {duration(now - self.start)}{self._eta(now)}")

    def end(self, note: str = "") -> None:
        """The phase is over; ``note``: its result in a few words (e.g. the perplexity)."""
        tail = f", {note}" if note else ""
        say(f"{self.what}: done, {self._count()} in {duration(time.perf_counter() - self.start)}{tail}")

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done} {self.unit}"
        return f"{self.done}/{'~' if self.about else ''}{self.total} {self.unit}"

    def _eta(self, now: float) -> str:
        if self.total is None or self.done == 0 or self.done > self.total:
            return ""
        return f", ETA {duration((now - self.start) / self.done * (self.total - self.done))}"


__all__ = ["Phase", "configure", "duration", "enabled", "reporting", "say"]
