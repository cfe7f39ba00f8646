"""Named points where a test can stop a run, to kill it there and check what a crash leaves behind.

`reached("layer-0-saved")` does nothing unless the environment names that point in TLQ_STOP_AT (a
comma-separated list); then the process stops itself with SIGSTOP, and the test that started it sends
SIGKILL or SIGTERM while it is frozen at exactly that point. Points: `importance-saved`,
`layer-N-saved` (layer N and the next layer's inputs are recorded), `export-staged` (the output is
complete in its temporary folder, not yet renamed), `export-renamed` (the output is in place; the old
work folder waits in a `.OUT.old-*` sibling to be removed).
"""

from __future__ import annotations

import os
import signal

ENV = "TLQ_STOP_AT"


def reached(point: str) -> None:
    names = os.environ.get(ENV)
    if names and point in names.split(","):
        os.kill(os.getpid(), signal.SIGSTOP)
