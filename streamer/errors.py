"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""
