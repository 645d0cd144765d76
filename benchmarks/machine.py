"""Facts about the machine that both benchmarks print beside their figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (``/proc/stat``); None off Linux.  Minus a
    process's own CPU time, it tells how much other work disturbed a measurement."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def status_bytes(field: str) -> int:
    """A size from ``/proc/self/status``: ``VmRSS`` (resident now) or ``VmHWM`` (the peak of
    this process image).  Not ``getrusage``'s ``ru_maxrss``: a child started by
    ``subprocess`` inherits its parent's peak there through fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")
