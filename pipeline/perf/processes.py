"""Counting the Ray worker processes a run starts (a run must never start more than actors + a few)."""

from __future__ import annotations

import threading
import time

import psutil


def ray_worker_processes() -> int:
    """Python worker processes of every Ray instance on this machine (`default_worker.py`)."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any("default_worker.py" in part for part in process.info["cmdline"] or ()):
                count += 1
        except psutil.Error:
            continue
    return count


class PeakRayWorkers:
    """Samples the process table while a `with` block runs; `.peak` is the most workers alive at once."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, ray_worker_processes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRayWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
