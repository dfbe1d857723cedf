"""A CPU session's weights in 2 MB pages.

A decode step streams every weight once per token. onnxruntime keeps weights it copies or
prepacks (float32 MatMul's packed B, above all) in anonymous memory, which Linux backs with
4 KB pages unless asked otherwise (transparent huge pages are "madvise" on most systems), and
in a virtual machine every TLB miss is a two-level page walk. So after a CPU session loads, the
anonymous mappings that appeared or grew while it loaded are collapsed into transparent huge
pages (madvise MADV_COLLAPSE, Linux 6.1+), once: on this 2-core VM SmolLM2's float32 decode
step went from 25.0 to 24.0 ms (minima over five alternated processes; ~0.8 s more load time
for 500 MB; past 2 GB per session the rest is advised only, for khugepaged to collapse in the
background). Only those mappings are touched (whole: Linux merges neighbouring anonymous
mappings, so one that grew may hold older memory too). Best effort: without Linux, with an
older kernel, THP "never" or too few free huge pages, nothing changes. flagc's own QGemv
copies its weights into huge pages itself (runtimes/kernels/weight_arena.cc).
FLAGC_HUGE_PAGES=0 turns this off.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["anonymous_mappings", "collapse_new_mappings", "enabled"]

_HUGE = 2 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25
_MIN_BYTES = 4 << 20  # below two huge pages a mapping is not a session's weights
# Collapsing copies memory (~1.6 s per GB here): past this much per session the rest is only
# advised, and the kernel's khugepaged collapses it in the background.
_COLLAPSE_LIMIT = 2 << 30


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("FLAGC_HUGE_PAGES", "1") != "0"


def anonymous_mappings() -> dict[int, int]:
    """start -> end of this process's private, writable, anonymous mappings."""
    found: dict[int, int] = {}
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 or not parts[1].startswith("rw") or parts[1][3] != "p":
                    continue  # file-backed, shared or read-only
                start, end = (int(x, 16) for x in parts[0].split("-"))
                found[start] = end
    except OSError:
        pass
    return found


def collapse_new_mappings(before: dict[int, int]) -> int:
    """Collapse the 2 MB-aligned parts of the anonymous mappings that are not in `before`, or
    grew since, into huge pages; returns the bytes collapsed."""
    if not enabled():
        return 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for start, end in anonymous_mappings().items():
        if before.get(start) == end:
            continue
        lo, hi = (start + _HUGE - 1) & ~(_HUGE - 1), end & ~(_HUGE - 1)
        if hi - lo < _MIN_BYTES:
            continue
        madvise(lo, hi - lo, _MADV_HUGEPAGE)  # khugepaged keeps it that way
        if collapsed + hi - lo <= _COLLAPSE_LIMIT and madvise(lo, hi - lo, _MADV_COLLAPSE) == 0:
            collapsed += hi - lo
    return collapsed
