"""``clipforge.allocator``: freed activation buffers stay in the process (no page faults on
reuse), the user's own allocator choices win, and nothing happens off glibc."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc malloc tuning is Linux only")

# First: is a 30 MB buffer served by mmap (glibc's mallinfo2 counts mmapped bytes)?  That is
# glibc's default for a fresh process, whose mmap threshold starts at 128 KiB; tuned, the
# threshold is 32 MB.  Then: allocate three 16 MB tensors (a ViT-B-32 MLP activation at batch
# 32) and free them, 20 times, counting the minor page faults of the last 10 rounds.  Tuned,
# the freed blocks are reused: no faults.  (Untuned, whether glibc trims them away depends on
# the heap's layout, so only the tuned count is asserted.)
PROBE = """
import ctypes, json, resource, sys, torch
import clipforge
from clipforge.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tune" else None

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
before = libc.mallinfo2().hblkhd
big = torch.ones(30 * 2**20 // 4)
mmapped = libc.mallinfo2().hblkhd - before
del big

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(20):
    if i == 10:
        start = faults()
    x = [torch.ones(4 * 2**20) for _ in range(3)]
    del x
print(json.dumps({"applied": applied, "again": keep_freed_memory() if applied else None,
                  "mmapped": mmapped, "faults": faults() - start}))
"""


def _probe(mode: str, **env: str) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                         env={**os.environ, **env}, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    plain = _probe("plain")
    tuned = _probe("tune")
    assert tuned["applied"] is True and tuned["again"] is True
    assert plain["mmapped"] >= 30 * 2**20  # glibc's default: its own mapping, unmapped on free
    assert tuned["mmapped"] == 0  # from the heap, kept for reuse
    assert tuned["faults"] < 1000  # 4096 pages of 4 KiB per tensor were not faulted in again


@pytest.mark.parametrize("env", [{"CLIPFORGE_MALLOC": "system"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
                                 {"MALLOC_TRIM_THRESHOLD_": "1000000"}])
def test_the_users_choice_is_left_alone(env: dict[str, str]) -> None:
    assert _probe("tune", **env)["applied"] is False


def test_building_a_cpu_model_tunes_the_process() -> None:
    code = ("import clipforge, clipforge.allocator as a; clipforge.create_model('tiny-vit'); "
            "print(a._applied)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "True"
