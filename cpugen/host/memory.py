"""What the operating system says about this process's memory."""

from __future__ import annotations

import math
import os
import resource


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status in bytes, or None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The high-water mark of this process's resident memory.

    Linux's VmHWM belongs to the address space, so it starts afresh at exec; ru_maxrss (the
    fallback elsewhere) keeps the parent's peak across fork+exec, which would credit a child
    started from a large process with its parent's memory."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def rss_file_bytes() -> int:
    """Resident pages that map files (shared libraries, mapped checkpoints): clean pages the kernel
    can drop and read back, so they count in RSS but not against an out-of-memory limit."""
    return _status_kib("RssFile") or 0


def reset_peak_rss() -> bool:
    """Starts peak_rss_bytes() afresh from the current resident memory (Linux: clear_refs 5), so that
    each batch of a sweep reports its own peak; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- huge pages ----------------------------------------------------------------------------------
HUGE = 2 << 20  # the x86-64 / arm64 transparent huge page
_MADV_HUGEPAGE = 14


def thp_mode() -> str | None:
    """The kernel's transparent huge page setting (always, madvise, never), or None without THP."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


_libc = None


def _huge_pages_on() -> bool:
    """THP available (always or madvise) and not switched off with CPUGEN_HUGEPAGES=0."""
    return thp_mode() in ("always", "madvise") and os.environ.get("CPUGEN_HUGEPAGES") != "0"


def advise_huge(t) -> int:
    """Asks the kernel to back the 2 MiB-aligned interior of tensor t's memory with huge pages;
    returns the bytes advised (0 where THP is off, t is small or the call fails). Call it before t
    is first written: pages already touched stay small until the kernel's background collapse.

    Decode streams every weight once a step: with 4 KiB pages the hardware prefetchers stop at
    each page boundary and every 4 KiB costs a TLB walk. Measured on 2 Zen 4 cores, 400 MB of
    bf16 weights, GB/s (4 KiB / 2 MiB pages): torch's sum 25.7 / 32.7, cpugen's gemv 28.8 / 31.8.
    CPUGEN_HUGEPAGES=0 turns the advice off (for A/B measurements)."""
    global _libc
    if t.device.type != "cpu" or not _huge_pages_on():
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    lo, hi = -(-start // HUGE) * HUGE, end // HUGE * HUGE
    if hi <= lo:
        return 0
    import ctypes

    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        ok = _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return 0
    return hi - lo if ok else 0


def empty_huge(shape, dtype) -> "torch.Tensor":
    """An uninitialized CPU tensor that starts on a 2 MiB boundary, advised onto huge pages
    (advise_huge), so that all of it but a last partial page is on them. A tensor allocated
    plainly starts anywhere: an 8 MiB weight then keeps about 2 MiB of 4 KiB pages at its two
    ends, and 48 such matrices streamed at 28 GB/s instead of 31 for the same bytes in one
    allocation (2 Zen 4 cores, interleaved). The view's storage is 2 MiB longer than the tensor;
    the part before the boundary is never written, so it never becomes resident."""
    import torch

    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < 2 * HUGE or not _huge_pages_on():
        t = torch.empty(shape, dtype=dtype)
        advise_huge(t)
        return t
    buf = torch.empty(nbytes + HUGE, dtype=torch.uint8)
    off = -buf.data_ptr() % HUGE
    t = buf[off:off + nbytes].view(dtype).view(shape)
    advise_huge(t)
    return t


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory on transparent huge pages (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def release_freed():
    """Hands the pages of freed tensors back to the OS (glibc only; elsewhere a no-op). A weight
    replaced by a repacked copy is freed, but glibc keeps freed chunks resident (most weights are
    below its mmap threshold) and the new copies often do not land in the holes."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
