"""Progress of a whole bench run: stage i/n, elapsed time, the estimated time left.

The run is planned up front as a list of :class:`Stage` s, each with its units of work (training
steps, evaluated items, merges) and a nominal cost per unit measured on a quiet 2-core machine. The
estimate of the time left is the nominal cost of the remaining work times the slowdown measured so
far on this machine (per kind of work, once there is enough of it; else over all work done), so it
corrects itself on a slower or faster machine within the first stages.

On a terminal the status line is redrawn at least every ``interval`` seconds (default 10) and
messages print above it; elsewhere (a log file, CI) the line is printed as a message when a stage
starts and every ``quiet_interval`` seconds.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO

__all__ = ["Stage", "Progress", "NOMINAL", "format_duration"]

# Seconds per unit on a quiet 2-core machine (2 threads): a training step of 16 image items (all
# parameters / language backbone / LoRA), of 32 text items; one evaluated item; one merge of the
# tiny model (reading, merging, writing); one optimisation step of a data-aware method that learns
# coefficients (AdaMerging: a forward and backward pass over a batch of each expert's samples).
NOMINAL = {"train_all": 0.13, "train_language": 0.07, "train_lora": 0.08, "train_text": 0.05,
           "eval": 0.004, "merge": 1.5, "optimise_step": 0.15}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass
class Stage:
    """One stage of the run: ``work`` maps a kind of :data:`NOMINAL` to its number of units."""

    name: str
    work: dict[str, float]
    unit: str = ""          # what ``done``/``total`` count in the status line ("steps", "items")
    total: float = 0.0
    done: float = 0.0
    spent: float = 0.0

    def nominal(self) -> float:
        return sum(NOMINAL[k] * n for k, n in self.work.items())


class Progress:
    """Tracks the stages of a run and reports them (see the module docstring)."""

    def __init__(self, stages: list[Stage], *, stream: TextIO | None = None, interval: float = 10.0,
                 quiet_interval: float = 60.0, enabled: bool = True):
        self.stages = stages
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if self.tty else quiet_interval
        self.enabled = enabled
        self.start = time.perf_counter()
        self.current: int | None = None
        self._stage_t0 = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    # -- estimates
    def nominal_total(self) -> float:
        return sum(s.nominal() for s in self.stages)

    def _slowdown(self) -> float:
        done_nominal = sum(s.nominal() * self._fraction(s) for s in self.stages)
        spent = sum(s.spent for s in self.stages) + (self._running_spent() if self.current is not None else 0.0)
        # rescale once there is something to go by: 5 s of work done and 5 s spent
        return spent / done_nominal if done_nominal > 5.0 and spent > 5.0 else 1.0

    def _fraction(self, s: Stage) -> float:
        return min(1.0, s.done / s.total) if s.total else 0.0

    def _running_spent(self) -> float:
        return time.perf_counter() - self._stage_t0

    def remaining(self) -> float:
        """Estimated seconds left."""
        left = sum(s.nominal() * (1.0 - self._fraction(s)) for s in self.stages)
        return left * self._slowdown()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def status(self) -> str:
        n = len(self.stages)
        if self.current is None:
            where = "starting" if not any(s.done for s in self.stages) else "finishing"
        else:
            s = self.stages[self.current]
            count = f" {s.done:.0f}/{s.total:.0f} {s.unit}" if s.total else ""
            where = f"stage {self.current + 1}/{n} {s.name}{count}"
        return (f"[{where}] elapsed {format_duration(self.elapsed())}, "
                f"about {format_duration(self.remaining())} left")

    # -- events
    def begin(self, index: int) -> None:
        with self._lock:
            self.current = index
            self._stage_t0 = time.perf_counter()
            s = self.stages[index]
            s.total = s.total or sum(s.work.values())
        if not self.tty:
            self.message(self.status())
        self._draw()

    def advance(self, units: float = 1.0) -> None:
        with self._lock:
            if self.current is not None:
                self.stages[self.current].done += units

    def end(self) -> None:
        with self._lock:
            if self.current is None:
                return
            s = self.stages[self.current]
            s.spent += self._running_spent()
            s.done = s.total
            self.current = None

    def skip(self, index: int) -> None:
        """A stage that turned out to need no work (a cached result): nothing left, nothing spent."""
        with self._lock:
            s = self.stages[index]
            s.work = {}
            s.total = s.done = 0.0

    def message(self, text: str) -> None:
        """Print ``text`` (above the status line on a terminal)."""
        if not self.enabled:
            return
        with self._lock:
            if self.tty and self._shown:
                self.stream.write("\r\033[K")
            self.stream.write(text + "\n")
            self._shown = False
            self.stream.flush()
        self._draw()

    def _draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        with self._lock:
            self.stream.write("\r\033[K" + self.status())
            self.stream.flush()
            self._shown = True

    # -- the ticker
    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            if self.tty:
                self._draw()
            else:
                self.message(self.status())

    def __enter__(self) -> "Progress":
        if self.enabled:
            self._thread = threading.Thread(target=self._tick, name="bench-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.enabled and self.tty and self._shown:
            with self._lock:
                self.stream.write("\r\033[K")
                self.stream.flush()
