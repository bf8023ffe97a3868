"""What the operating system says about this process's memory."""

from __future__ import annotations

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
