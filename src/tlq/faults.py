"""Named points of a run where a listener may act: how the crash tests stop a run at an exact point.

`reached("layer-0-saved")` calls every listener registered with `listen`; a run has none. The crash tests
start `tlq` through tests/stop_at.py, which registers a listener that stops the process with SIGSTOP at
the named points; the test then sends SIGKILL or SIGTERM while it is frozen exactly there. Points:
`importance-saved`, `layer-N-saved` (layer N and the next layer's inputs are recorded), `export-staged`
(the output is complete in its temporary folder, not yet renamed), `export-renamed` (the output is in
place; the old work folder waits in a `.OUT.old-*` sibling to be removed).
"""

from __future__ import annotations

from typing import Callable

_listeners: list[Callable[[str], None]] = []


def listen(listener: Callable[[str], None]) -> None:
    """Call `listener(point)` at every named point this process reaches."""
    _listeners.append(listener)


def reached(point: str) -> None:
    for listener in _listeners:
        listener(point)
