import os
import signal
import sys

# A rank of `streamer train --nproc N` (the launcher names its start in the environment):
# until its steps begin, a signal the launcher passes on stops the rank quietly, to be
# reported once by the launcher, whatever it interrupts, imports included
# ([Note: a signal before the steps] in streamer/cli.py).
LAUNCHED_RANK = bool(os.environ.get("STREAMER_STARTED_AT")) and int(os.environ.get("WORLD_SIZE", "1")) > 1
if LAUNCHED_RANK:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.default_int_handler)  # a KeyboardInterrupt, as SIGINT by default
try:
    if LAUNCHED_RANK and os.environ.get("STREAMER_READY_DIR"):  # the launcher may send signals from now on
        try:
            with open(os.path.join(os.environ["STREAMER_READY_DIR"], str(os.getpid())), "w"):
                pass
        except OSError:
            pass  # the launcher then sends them after a minute's wait (READY_WAIT_S)
    from streamer.cli import main

    code = main()
except KeyboardInterrupt:
    if LAUNCHED_RANK:
        sys.stdout.flush()
        sys.stderr.flush()
        # Not sys.exit: an interrupt that crossed native code (torch's imports) can leave
        # the interpreter to end itself by SIGINT at exit, which torchrun reports as a failure.
        os._exit(0)
    print("streamer: interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
