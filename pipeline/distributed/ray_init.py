"""Joining Ray: the cluster named by RAY_ADDRESS, else a local instance; Ray Data's console kept readable."""

from __future__ import annotations

import logging
import os
import sys

from pipeline.errors import UserError


class _DropUserErrorLogs(logging.Filter):
    """Ray Data logs a failed task's error while handling it (a traceback, and for an error it did not
    wrap itself a plea to report a Ray bug) before re-raising it. When that error is a UserError (an
    unreadable image, say) run_main prints its one line, which those records would bury."""

    def filter(self, record: logging.LogRecord) -> bool:
        logged = record.exc_info[1] if record.exc_info else None
        handled = sys.exc_info()[1]  # the records are emitted inside Ray Data's `except` blocks
        return not any(isinstance(error, UserError) for error in (logged, handled))


def _quiet_user_error_logs() -> None:
    """Filter the console only; Ray Data's log file in the session directory keeps every record."""
    import ray.data  # noqa: F401  (importing it sets up the "ray.data" logger's handlers)

    for handler in logging.getLogger("ray.data").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _DropUserErrorLogs) for f in handler.filters):
            handler.addFilter(_DropUserErrorLogs())


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS (as `ray job submit` sets it), else start a local Ray."""
    import ray

    _quiet_user_error_logs()
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
