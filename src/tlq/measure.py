"""Peak resident memory of a command (measured so that the caller's own memory does not leak into it),
and a glibc setting that keeps the resident memory of a layer-by-layer run from creeping up.

    python -m tlq.measure OUT.json -- COMMAND ARGS...

On Linux a child's `ru_maxrss` (what wait4 reports) starts from the high-water mark of the process that
spawned it: a benchmark that holds 4 GB and starts `tlq quantize` sees at least 4 GB, whatever the
child really used. This small process is started first; it spawns the command and reports the largest
`ru_maxrss` among its children, whose starting point is this process's few megabytes.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's own peak RSS since it started (VmHWM; it is reset when a process execs)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _set_mmap_threshold(threshold_bytes: int) -> bool:
    """glibc's M_MMAP_THRESHOLD (setting it also turns off the dynamic threshold); False elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from malloc.h
    return bool(mallopt(m_mmap_threshold, threshold_bytes))


_prompt_for_the_run = False  # release_freed_memory_promptly() was called for the whole run (--lazy)
# Where glibc's dynamic threshold ends after the first large block is freed (DEFAULT_MMAP_THRESHOLD_MAX on
# 64-bit): restoring it leaves the allocator as a default run has it by then.
_GLIBC_DYNAMIC_MAX = 32 * 2**20


def release_freed_memory_promptly(threshold_bytes: int = 1 << 20) -> bool:
    """Ask glibc to serve every allocation of `threshold_bytes` or more from its own memory map.

    Layer-by-layer calibration frees and reallocates tensors of many sizes; glibc's default (a
    threshold that grows up to 32 MB as blocks are freed) keeps freed blocks in the heap, where
    fragmentation makes the resident size creep up layer after layer. Mapped blocks go back to the
    OS when freed. Measured on the lazy benchmark's 3-layer profile: per-layer peak 993 MiB steady,
    against 933 -> 1220 MiB growing. Returns False where this is not glibc (nothing changes).
    """
    global _prompt_for_the_run
    done = _set_mmap_threshold(threshold_bytes)
    _prompt_for_the_run = _prompt_for_the_run or done
    return done


@contextmanager
def freed_memory_returned_promptly(threshold_bytes: int = 1 << 20) -> Iterator[None]:
    """Within the block, blocks of `threshold_bytes` or more are memory-mapped (returned to the OS when freed).

    For the scale search: it captures long-lived per-sample rows while allocating and freeing per-sample
    activations of 1-10 MB between them, so freed blocks sit in heap holes glibc cannot give back
    (measurements: benchmarks/results/cost/README.md, "TLQ's remaining memory"). Scoped, not for the
    whole run, because mapping every block cost GPTQ's phases time in page faults.
    Nothing changes where this is not glibc, or where the whole run already releases promptly (--lazy).
    """
    changed = not _prompt_for_the_run and _set_mmap_threshold(threshold_bytes)
    try:
        yield
    finally:
        if changed:
            _set_mmap_threshold(_GLIBC_DYNAMIC_MAX)


_libc = None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim; nothing elsewhere).

    Called before each solve, the step that allocates the largest matrices: the forward passes before
    it leave freed activation blocks scattered in the heap, which would otherwise stay resident under
    the solve's peak. Measured at Qwen2-VL 2B widths, GPTQ, 2 layers, 32 samples: peak RSS 2509 ->
    2308 MiB at no measurable time (a lower mmap threshold for all allocations saved more, 2230 MiB,
    but cost 23% more time in page faults).
    """
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - not glibc: AttributeError
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def main() -> int:
    out, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        print("usage: python -m tlq.measure OUT.json -- COMMAND ...", file=sys.stderr)
        return 2
    start = time.perf_counter()
    code = subprocess.call(command)
    Path(out).write_text(json.dumps({
        "returncode": code, "wall_seconds": round(time.perf_counter() - start, 2),
        "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) * 1024}))
    return code


if __name__ == "__main__":
    sys.exit(main())
