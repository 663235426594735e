"""Counting the Ray worker processes a run starts (a run must never start more than actors + a few)."""

from __future__ import annotations

import threading
import time

import psutil


def ray_worker_processes(session: str | None = None) -> int:
    """Python worker processes (`default_worker.py`) of the Ray session named `session`, or of every Ray
    instance on this machine. Another instance's workers (a second test process, another user's job)
    are not this run's."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or ()
            if any("default_worker.py" in part for part in cmdline) and (
                    session is None or f"--session-name={session}" in cmdline):
                count += 1
        except psutil.Error:
            continue
    return count


def current_ray_session() -> str | None:
    """The name of the Ray session this process is connected to, if any."""
    import sys

    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized():
        return None
    return sys.modules["ray"].get_runtime_context().get_session_name()


class PeakRayWorkers:
    """Samples the process table while a `with` block runs; `.peak` is the most workers alive at once,
    of this process's Ray session when it has one (else of every instance)."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.session = current_ray_session()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, ray_worker_processes(self.session))
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRayWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
