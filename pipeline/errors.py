"""Errors that the jobs turn into one clear line and exit code 2 instead of a traceback."""


class UserError(ValueError):
    """Bad user input (missing file, wrong schema, unknown preset): print the message alone, exit 2."""
