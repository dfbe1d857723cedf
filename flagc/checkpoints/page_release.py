"""Copy a tensor out of a memory-mapped checkpoint and drop its pages from the process.

`torch.load(mmap=True)` (pytorch_model.bin) maps the whole file; every page a build reads stays
mapped, so converting a 20 GB checkpoint tensor by tensor ends with a 20 GB RSS of file pages
(FlagAI's GLM-10b-ch ships as one such file). Copying a tensor out and telling the kernel we no
longer need its pages (MADV_DONTNEED) keeps only the copy resident. The pages are clean (nothing
writes to a checkpoint), so dropping them loses nothing: a later read faults them back in from
the file.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["copy_out", "release_pages", "mapped_ranges"]

_MADV_DONTNEED = 4  # linux/mman.h


def _madvise():
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return fn
    except (OSError, AttributeError):  # not a libc with madvise
        return None


_MADVISE = _madvise()


def mapped_ranges(path: str) -> list[tuple[int, int]]:
    """Address ranges where `path` is mapped into this process (Linux /proc/self/maps)."""
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() == real:
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def release_pages(tensor, ranges: list[tuple[int, int]]) -> None:
    """Drop the whole pages under `tensor`'s bytes, only where they lie in one of `ranges` (a
    file map: never heap memory, which MADV_DONTNEED would zero)."""
    if _MADVISE is None or tensor.numel() == 0:
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(lo <= start and end <= hi for lo, hi in ranges):
        return
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page
    if last > first:
        _MADVISE(first, last - first, _MADV_DONTNEED)


def copy_out(tensor, ranges: list[tuple[int, int]]):
    """A private copy of a tensor that lives in a checkpoint map; the mapped pages are released."""
    copy = tensor.clone()
    release_pages(tensor, ranges)
    return copy
