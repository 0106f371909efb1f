"""Benchmarks' guard against a filesystem still paying for a mass delete.

On an ext4 without a journal, creating a file skips every free inode of its block group that
was deleted in the last 60 s (360 s while the inode table block is not yet written back): the
kernel's ``recently_deleted``, a buffer-cache lookup per skipped inode. Right after a big
``rm -r`` (a test run, the last benchmark's clean-up) a create then costs 100-800 us of kernel
time instead of 20-30, and a benchmark run then measures that more than the code. Before
measuring, the benchmarks wait (bounded) until creating a file in their work dir is cheap again,
and print how long they waited. Journaled filesystems and tmpfs do not do this: the first probe
passes.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

# Kernel time a create may cost on a quiet filesystem: 17-28 us measured here. (At 50, runs let
# through bare loops at 36-49 us a row, and filedrop's ratios against them looked 0.1-0.3 better.)
QUIET_US = 35
PROBE_FILES = 500
WAIT_LIMIT = 390.0  # s: the kernel's longest "recently deleted" window (60 + 300 s) and a margin
PROBE_EVERY = 15.0  # s between probes while waiting


def create_cost_us(directory: Path, files: int = PROBE_FILES) -> float:
    """Kernel time (us) per file to create ``files`` 1 KiB files in a new subdirectory of
    ``directory``. The files stay: deleting them would start the clock again."""
    probe = Path(directory) / f".fs-probe-{time.monotonic_ns()}"
    probe.mkdir()
    page = b"x" * 1024
    t0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
    for i in range(files):
        fd = os.open(probe / f"{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, page)
        finally:
            os.close(fd)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_stime - t0) / files * 1e6


def wait_quiet(directory: Path, limit_us: float = QUIET_US, timeout: float = WAIT_LIMIT) -> str:
    """Wait until creating a file in ``directory`` costs at most ``limit_us`` us of kernel time
    (probed every ``PROBE_EVERY`` s, for ``timeout`` s at most); a line saying how it went."""
    t0 = time.monotonic()
    cost = create_cost_us(directory)
    while cost > limit_us and time.monotonic() - t0 < timeout:
        time.sleep(PROBE_EVERY)  # the kernel's window runs on the clock: nothing to poll but the cost itself
        cost = create_cost_us(directory)
    waited = time.monotonic() - t0
    state = "quiet" if cost <= limit_us else f"STILL SLOW after {timeout:.0f} s"
    return (f"filesystem {state}: creating a file cost {cost:.0f} us of kernel time "
            f"(waited {waited:.0f} s for <= {limit_us:.0f})")
