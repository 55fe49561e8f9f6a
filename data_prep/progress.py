"""A one-line progress bar on stderr: done/total, documents/s, images/s, ETA.

Hand-written (no dependency); drawn only when stderr is a terminal and --quiet is not given, at most
five times a second.
"""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, enabled: bool = True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.label, self.total = label, total
        self.done = self.docs = self.images = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, done: int = 0, docs: int = 0, images: int = 0) -> None:
        self.done += done
        self.docs += docs
        self.images += images
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            self.stream.write("\r" + self.line(now) + "\x1b[K")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        dt = max(1e-9, (now or time.perf_counter()) - self.t0)
        frac = self.done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        eta = (dt / frac - dt) if 0 < frac < 1 else 0.0
        return (f"{self.label} [{bar}] {self.done}/{self.total}  {self.docs / dt:,.0f} docs/s  "
                f"{self.images / dt:,.0f} images/s  ETA {int(eta) // 60}:{int(eta) % 60:02d}")

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r" + self.line() + "\x1b[K\n")
            self.stream.flush()
