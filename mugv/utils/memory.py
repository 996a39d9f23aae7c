"""Host memory measurement: the peak resident set size of this process over a block of code."""

from __future__ import annotations

import threading
import time

import psutil


class PeakRSS:
    """`with PeakRSS() as m: ...` then m.extra: the peak RSS above the RSS at entry (bytes),
    sampled every `interval_s` by a background thread (short-lived spikes between samples are
    missed; the block's own allocations of more than a few ms are not)."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.baseline = self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSS:
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline
