"""runtimes/huge_pages.py: after a CPU session loads, the anonymous memory it allocated is
collapsed into 2 MB pages, and nothing else."""

import mmap
import os

import pytest

from flagc.runtimes import huge_pages


def _thp_mode() -> str:
    """always / madvise / never (transparent huge pages), or "" without them."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return ""


def _thp_collapse_supported() -> bool:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return _thp_mode() in ("always", "madvise") and (major, minor) >= (6, 1)  # MADV_COLLAPSE


def _huge_kb(start: int, end: int) -> int:
    """AnonHugePages (kB) of the mapping [start, end) in /proc/self/smaps."""
    inside, total = False, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                inside = a <= start < b or start <= a < end
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not huge_pages.enabled() or not _thp_collapse_supported(),
                    reason="needs Linux 6.1+ with transparent huge pages")
def test_new_anonymous_memory_is_collapsed_and_nothing_else():
    import ctypes

    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS  # as malloc's (onnxruntime's) memory
    before = huge_pages.anonymous_mappings()
    new = mmap.mmap(-1, 16 << 20, flags=private)
    new.write(bytes(range(256)) * (len(new) // 256))
    addr = ctypes.addressof(ctypes.c_char.from_buffer(new))
    if _thp_mode() == "madvise":
        assert _huge_kb(addr, addr + (16 << 20)) == 0  # 4 KB pages until asked
    assert huge_pages.collapse_new_mappings(before) >= 12 << 20  # its 2 MB-aligned part
    assert _huge_kb(addr, addr + (16 << 20)) >= 12 << 10
    assert new[:256] == bytes(range(256)) and new[-1] == 255  # the same contents
    # mappings as they are now: nothing new, nothing touched
    assert huge_pages.collapse_new_mappings(huge_pages.anonymous_mappings()) == 0


def test_it_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FLAGC_HUGE_PAGES", "0")
    assert not huge_pages.enabled()
    assert huge_pages.collapse_new_mappings({}) == 0
