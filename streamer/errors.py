"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""


class Stopped(Exception):
    """A run that stopped early, as asked by a signal, after a whole step (and its
    checkpoint, when the run writes them); the message says where and how to go on."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
