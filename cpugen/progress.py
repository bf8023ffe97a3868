"""Progress of long work on stderr, shown only when stderr is a terminal and not silenced."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, what: str, enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.what, self.t0, self._last = what, time.perf_counter(), 0.0

    def update(self, done: int, total: int, detail: str = ""):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < total and now - self._last < 0.2:
            return
        self._last = now
        msg = f"\r{self.what}: {done}/{total} {detail} [{now - self.t0:.1f}s]"
        self.stream.write(msg + ("\n" if done >= total else ""))
        self.stream.flush()


def progress(what: str, quiet: bool) -> Progress | None:
    return None if quiet else Progress(what)
