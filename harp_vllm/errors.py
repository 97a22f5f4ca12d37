"""The exceptions the CLI turns into a clean, single-line error, and their exit statuses.

Every ``harp-vllm`` command exits 2 on a usage error (``UserError``: a bad path, file, model or
option) and 1 on a runtime failure (``RunFailure``: the input was fine, running it failed).
"""

USAGE_EXIT = 2
RUNTIME_EXIT = 1


class UserError(Exception):
    """Bad input from the user (path, file, model, option); the message says what is wrong."""

    exit_code = USAGE_EXIT


class RunFailure(UserError):
    """The command was well-formed but failed while running (a service exited, a port was
    taken, nothing became healthy); the message says what happened."""

    exit_code = RUNTIME_EXIT


def describe(e: BaseException) -> str:
    """``TypeName: first line of the message`` (at most 200 characters of it), for one-line
    error reports."""
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
