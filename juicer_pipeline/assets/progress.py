"""Progress lines for long per-batch loops, at most one every few seconds.

Every `context.log` line is an event in Dagster's event log (about 5 ms each, measured, and a
row in the run's storage). A line per batch is thousands of lines on a large drop: 3125 for
`patch_saliency` on 200k images, in batches of 64.

Each line ends with the process's resident memory, so a stage whose memory grows with the drop
shows it while it runs, not only when the machine runs out."""
from __future__ import annotations

import os
import time
from typing import Callable

PROGRESS_EVERY_S = 5.0


class ThrottledProgress:
    def __init__(self, log: Callable[[str], None], every_s: float = PROGRESS_EVERY_S):
        self.log, self.every_s = log, every_s
        self._last = time.perf_counter()

    def __call__(self, message: Callable[[], str]) -> None:
        """Log `message()` if the last line is `every_s` old; the message is built only then."""
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            rss = resident_mb()
            self.log(message() if rss is None else f"{message()} (RSS {rss:.0f} MB)")


def resident_mb() -> float | None:
    """This process's resident memory now, in MB; None where /proc is not there (not Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None
