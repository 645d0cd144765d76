"""Keep freed activation memory in the process, so CPU inference does not fault it in again.

Why: a ViT-B-32 batch of 32 allocates activations of 5-20 MB per layer.  glibc's malloc serves
blocks that large with ``mmap`` and gives them back to the kernel on ``free`` (or trims them off
the heap top), so every layer of every batch page-faults fresh, zeroed pages in.  On 2 Zen 4
cores that costs 10 % of float32 and 25 % of int8 ViT-B-32 throughput.  Raising glibc's mmap
threshold to its maximum (32 MB) and its trim threshold out of reach keeps freed blocks for
reuse, as jemalloc and tcmalloc do; the price is that a process's memory stays at its peak.

:func:`keep_freed_memory` is called once, when a model is built or loaded for the CPU.  It does
nothing off glibc, where the user already chose (``GLIBC_TUNABLES`` malloc settings,
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, another allocator in ``LD_PRELOAD``), or
with ``CLIPFORGE_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
_TRIM_NEVER = 2**31 - 1

_applied: bool | None = None


def _user_chose() -> bool:
    env = os.environ
    if env.get("CLIPFORGE_MALLOC", "").lower() == "system":
        return True
    if "malloc" in env.get("GLIBC_TUNABLES", ""):
        return True
    if any(k in env for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                              "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")):
        return True
    preload = env.get("LD_PRELOAD", "")
    return any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc"))


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as the module docstring says, once per process; True where the
    setting is in force (by this call or an earlier one)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or _user_chose():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries: nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                    and mallopt(_M_TRIM_THRESHOLD, _TRIM_NEVER))
    return _applied


__all__ = ["keep_freed_memory"]
