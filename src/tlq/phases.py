"""Where a calibration run's time goes: named phases, summed over layers, recorded in tlq_recipe.json.

    clock = PhaseClock(show=lambda name: bar.set_postfix_str(name))
    with clock("observe"): ...
    clock.seconds  -> {"observe": 1.23, ...}

Phases of `tlq quantize`: load (model and processor), samples (rendering the calibration records),
capture (layer-0 inputs), importance (the gradient pass), and per layer reference (the FP layer's
outputs), rescale (scale search / SmoothQuant), observe (feeding the Linears' inputs to the solvers),
solve, propagate (the quantized layer's outputs, the next layer's inputs), save (the work folder), then
export (compressing and writing the output). `show` lets a progress bar say which phase is running.

Memory: at the end of each phase the clock reads the process's resident high-water mark (VmHWM, which
only grows); a phase that raised it is recorded with the mark it left (`peaks`; tlq_recipe.json's
`phase_peak_rss_mib`), so the phase
holding the run's peak is known exactly, without a sampling thread and without resetting the mark (a
reset would also hide the peak from whoever measures the process from outside).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

from tlq.measure import peak_rss_bytes


class PhaseClock:
    def __init__(self, show: Callable[[str], None] | None = None, peaks: dict[str, int] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.show = show
        # phase -> the high-water mark (bytes) it raised the process to; shared with child clocks. A new
        # clock records only rises above the mark at its creation (an earlier phase owns what came before).
        self.peaks: dict[str, int] = peaks if peaks is not None else {}
        self.floor = peak_rss_bytes() if peaks is None else 0

    def child(self) -> "PhaseClock":
        """A clock of its own seconds (one layer's phases) that shares this one's display and peaks."""
        child = PhaseClock(self.show, self.peaks)
        child.floor = self.floor
        return child

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.show is not None:
            self.show(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.note_peak(name)

    def note_peak(self, name: str) -> None:
        """Record `name` if the process's high-water mark rose above every mark recorded so far."""
        mark = peak_rss_bytes()
        if mark > max(self.peaks.values(), default=self.floor):
            self.peaks[name] = mark

    def merge(self, seconds: dict[str, float]) -> None:
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}

    def peaks_mib(self) -> dict[str, float]:
        """Each phase that raised the process's peak resident memory, with the peak it left (MiB); the
        largest value is the run's peak up to now, reached during that phase."""
        return {name: round(value / 2**20, 1) for name, value in self.peaks.items()}
