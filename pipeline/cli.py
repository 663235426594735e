"""What every job shares: one-line errors with exit code 2, output-dir safety, joining Ray."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import fsspec

from pipeline.errors import UserError

EXIT_USER_ERROR = 2


def user_error_message(error: BaseException) -> str:
    """First line of the underlying message; Ray wraps errors raised in tasks (RayTaskError.cause)."""
    cause = getattr(error, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_main(main: Callable[[], None]) -> None:
    """Run a job's main(): UserError → 'error: …' on stderr and exit 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except UserError as error:
        print(f"error: {user_error_message(error)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Exception as error:  # Ray re-raises task errors as RayTaskError subclasses of the cause
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            print(f"error: {user_error_message(cause)}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        raise


def prepare_out_dir(out: str, overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty output unless --overwrite (which clears it) or --resume (which reuses it)."""
    if overwrite and resume:
        raise UserError("--overwrite and --resume are mutually exclusive")
    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and not fs.isdir(path):
        raise UserError(f"--out {out} exists and is not a directory")
    entries = fs.ls(path) if fs.exists(path) else []
    if entries and not (overwrite or resume):
        raise UserError(f"--out {out} is not empty; pass --resume to continue that run or --overwrite to replace it")
    if entries and overwrite:
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)


def join(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}"


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
