"""The one exception type the CLI turns into a clean, single-line error."""


class UserError(Exception):
    """Bad input from the user (path, file, model, option); the message says what is wrong."""
