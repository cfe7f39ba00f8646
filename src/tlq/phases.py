"""Where a calibration run's time goes: named phases, summed over layers, recorded in tlq_recipe.json.

    clock = PhaseClock(show=lambda name: bar.set_postfix_str(name))
    with clock("observe"): ...
    clock.seconds  -> {"observe": 1.23, ...}

Phases of `tlq quantize`: load (model and processor), samples (rendering the calibration records),
capture (layer-0 inputs), importance (the gradient pass), and per layer reference (the FP layer's
outputs), rescale (scale search / SmoothQuant), observe (feeding the Linears' inputs to the solvers),
solve, propagate (the quantized layer's outputs, the next layer's inputs), save (the work folder), then
export (compressing and writing the output). `show` lets a progress bar say which phase is running.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator


class PhaseClock:
    def __init__(self, show: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.show = show

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.show is not None:
            self.show(name)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def merge(self, seconds: dict[str, float]) -> None:
        for name, value in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + value

    def rounded(self) -> dict[str, float]:
        return {name: round(value, 3) for name, value in self.seconds.items()}
