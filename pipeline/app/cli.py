"""What every job shares: one-line errors with exit code 2, output-dir safety."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

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
