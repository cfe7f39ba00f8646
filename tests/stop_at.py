"""Run the tlq command line, stopping the process (SIGSTOP) when it reaches one of the named points.

    python tests/stop_at.py layer-0-saved[,export-staged] -- quantize MODEL --out OUT ...

What the crash tests start instead of `python -m tlq`: the stop is a tlq.faults listener registered here,
so the product itself has no test hook to switch on."""

import os
import signal
import sys

from tlq import faults
from tlq.cli import main


def _stop_at(points: set[str]):
    def listener(point: str) -> None:
        if point in points:
            os.kill(os.getpid(), signal.SIGSTOP)

    return listener


if __name__ == "__main__":
    names, separator, *argv = sys.argv[1:]
    assert separator == "--", "usage: stop_at.py POINT[,POINT] -- TLQ ARGUMENTS"
    faults.listen(_stop_at(set(names.split(","))))
    # A suite started in the background of a non-interactive shell (`cmd &`) hands its children SIGINT
    # ignored; the crash tests send SIGINT as a Ctrl-C would, so the run gets Python's own handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main(argv))


def stopping(points: str, argv: list[str]) -> list[str]:
    """`argv` (`python -m tlq ARGS...`) as a command that stops itself at `points`."""
    assert argv[1:3] == ["-m", "tlq"], argv[:3]
    return [argv[0], __file__, points, "--", *argv[3:]]
