"""What every job shares: one-line errors with exit code 2, output-dir safety."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import fsspec

from pipeline.config import ConfigError
from pipeline.errors import UserError

EXIT_USER_ERROR = 2

FLAG_NAMES = {
    "sigmas": "--sigmas", "n_select": "--n-select", "n": "--n", "alpha": "--alpha", "family_wise": "--family-wise",
    "alpha_mode": "--alpha-mode", "p0": "--p0", "routing": "--routing", "radius_tolerance": "--radius-tolerance",
    "target_radii": "--target-radius", "adaptive_select": "--adaptive-select", "seed": "--seed",
    "adaptive": "--adaptive", "all_scales": "--all-scales",
    "early_exit": "early exit", "family_size": "the number of images",
}
"""The flag each configuration field is set by: a ConfigError names the flags in a job's error line."""


def user_error_message(error: BaseException) -> str:
    """First line of the underlying message; Ray wraps errors raised in tasks (RayTaskError.cause)."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    text = (error.with_names(FLAG_NAMES) if isinstance(error, ConfigError) else str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_main(main: Callable[[], None]) -> None:
    """Run a job's main(): UserError → 'error: …' on stderr and exit 2, never a traceback.

    The exit happens after the `except` blocks, once the error and its traceback are released: exiting
    inside them kept main()'s frames (pyarrow tables and datasets among their locals) alive until the
    interpreter's shutdown, where freeing them aborted the process now and then ("terminate called
    without an active exception")."""
    status = exit_status(main)
    if status:
        sys.exit(status)


def exit_status(main: Callable[..., object], *args: object) -> int:
    """Run main(*args) as `run_main` does, but return the exit status (0, or 2 after printing the
    one-line error) instead of exiting: for jobs whose main(argv) returns it."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    message = None
    try:
        main(*args)
    except UserError as error:
        message = user_error_message(error)
    except Exception as error:  # Ray re-raises task errors as RayTaskError subclasses of the cause
        cause = getattr(error, "cause", None)
        if not isinstance(cause, UserError):
            raise
        message = user_error_message(cause)
    if message is None:
        return 0
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


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
