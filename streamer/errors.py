"""User-facing errors: the CLI prints these as one line and exits non-zero, no traceback."""

# The exit status of a run that stopped for want of time (`train --time-limit`):
# EX_TEMPFAIL of sysexits.h, "try again later", which is what the run asks for (the same
# command with --resume goes on). A job script can requeue on it.
OUT_OF_TIME = 75


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""


class Stopped(Exception):
    """A run that stopped early after a whole step (and its checkpoint, when the run
    writes them), as a signal or its time limit asked; the message says where and how
    to go on, `status` is the process's exit status (128 + the signal's number, or
    OUT_OF_TIME)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGUSR1 outside a run's steps, taken as Ctrl-C is: the command ends at
    once, and a run that had not begun removes what it made (its store, a new --out);
    their default action would kill the process with none of that. `signum` gives the
    exit status, 128 + it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def interrupt_on(*signums: int) -> dict:
    """Have these signals raise `Interrupted` in the main thread; returns the handlers
    they had, for `signal.signal` to put back."""
    import signal
    import threading

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():  # where Python runs handlers, and sets them
        return {}
    return {signum: signal.signal(signum, interrupt) for signum in signums}
