"""How long static batching keeps a batch open for more jobs: a window that stays open while jobs arrive.

Measured on 2 CPU cores (docs/benchmarks.md, "Bursts"): 16 requests posted at once reach the queue
over 0.1-0.3 s, at gaps of up to 81 ms, since the API and the clients share the cores. A fixed
window after the first job (DIT_MAX_WAIT_MS, 20 ms) closes long before such a burst is in, and the
burst runs as two or more batches. So the window closes at the latest of

- `max_wait_ms` after the first job (what a lone job waits: a lone job sees no arrival), and
- `gap_ms` after the latest job that joined (a burst under way keeps it open),

but never later than `max_fill_ms` after the first job (the most any job waits for partners), and at
once when the batch is full. With gap 0 and max_fill <= max_wait it is the fixed window of before.
"""

import time
from collections.abc import Callable

MS_PER_S = 1000


class FillWindow:
    """The fill window of one batch, opened when its first jobs were taken."""

    def __init__(
        self,
        max_wait_ms: int,
        gap_ms: int,
        max_fill_ms: int,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.clock = clock
        self.opened = clock()
        self.closes_at = self.opened + max_wait_ms / MS_PER_S
        self.gap_s = gap_ms / MS_PER_S
        # Never shorter than the fixed window: max_fill_ms 0 means "no extension".
        self.latest = self.opened + max(max_fill_ms, max_wait_ms) / MS_PER_S

    def arrived(self) -> None:
        """A job joined the batch: keep the window open `gap_ms` from now, up to `max_fill_ms`."""
        self.closes_at = min(max(self.closes_at, self.clock() + self.gap_s), self.latest)

    def remaining_s(self) -> float:
        """Seconds until the window closes (0 or less: closed)."""
        return self.closes_at - self.clock()
