"""tlq.phases: seconds per phase, and which phase raised the process's peak resident memory."""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, time, torch
from tlq.measure import peak_rss_bytes
from tlq.phases import PhaseClock

clock = PhaseClock()
with clock("small"):
    a = torch.ones(1 << 20)  # 4 MiB, freed at once: may or may not raise the mark
    del a
with clock("big"):
    b = torch.ones(100 << 20)  # 400 MiB, touched
    del b
layer = clock.child()
with layer("after"):  # below the mark "big" left: not recorded
    c = torch.ones(10 << 20)
    del c
with layer("bigger"):
    d = torch.ones(150 << 20)  # 600 MiB
    del d
clock.merge(layer.seconds)
print(json.dumps({"peaks": clock.peaks, "mark": peak_rss_bytes(), "seconds": clock.rounded()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_the_phase_that_raised_the_peak_is_recorded_with_it():
    # A fresh process: the test runner's own high-water mark would hide every phase of this one.
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                                    timeout=120).stdout)
    peaks, mark = out["peaks"], out["mark"]
    assert "after" not in peaks  # it stayed under the mark "big" left
    assert peaks["big"] >= 400 << 20 and peaks["bigger"] >= peaks["big"] + (150 << 20)
    assert max(peaks.values()) == peaks["bigger"] == mark  # the largest recorded peak is the process's
    assert set(out["seconds"]) == {"small", "big", "after", "bigger"}
