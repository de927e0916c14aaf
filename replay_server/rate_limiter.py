"""Keep the learner's sampling rate tied to the actors' insert rate.

Reverb's ``SampleToInsertRatio``, learner side only (Ape-X actors never block):
sampling starts once ``min_size`` transitions are stored, and a batch of ``n``
may be drawn while ::

    sampled + n <= samples_per_insert * (inserted - min_size) + tolerance

so the learner runs at most ``tolerance`` samples ahead of the configured
replay ratio. ``samples_per_insert = 0`` disables the ratio (only ``min_size``
holds). At the first check, ``sampled`` is credited as if the learner had kept
the ratio since ``min_size`` (a resumed run against a full replay does not get
a huge burst).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    """Thread-safe: :meth:`acquire` reserves sample budget atomically.

    tolerance: samples the learner may run ahead; None = 2 batches.
    """

    def __init__(
        self, min_size: int, samples_per_insert: float = 0.0, tolerance: float | None = None
    ) -> None:
        if min_size < 1:
            raise ValueError(f"min_size={min_size} must be >= 1")
        if samples_per_insert < 0:
            raise ValueError(
                f"samples_per_insert={samples_per_insert} must be >= 0 (0 = unlimited)"
            )
        self.min_size = int(min_size)
        self.samples_per_insert = float(samples_per_insert)
        self.tolerance = tolerance
        self.sampled = 0.0
        self.waited_s = 0.0
        self._credited = False
        self._lock = threading.Lock()

    def allowed(self, n: int, inserted: int, size: int) -> bool:
        """Would a batch of n be within the limits? (no reservation)"""
        with self._lock:
            return self._ok(n, inserted, size)

    def _ok(self, n: int, inserted: int, size: int) -> bool:
        if size < self.min_size or size < 1:
            return False
        spi = self.samples_per_insert
        if spi <= 0:
            return True
        if not self._credited:
            self.sampled = spi * max(0, inserted - self.min_size)
            self._credited = True
        tol = self.tolerance if self.tolerance is not None else 2.0 * n
        return self.sampled + n <= spi * (inserted - self.min_size) + tol

    def try_acquire(self, n: int, inserted: int, size: int) -> bool:
        with self._lock:
            if not self._ok(n, inserted, size):
                return False
            self.sampled += n
            return True

    def release(self, n: int) -> None:
        """Give back budget reserved for rows that were not delivered."""
        with self._lock:
            self.sampled -= n

    def acquire(
        self,
        n: int,
        counts: Callable[[bool], tuple[int, int]],
        timeout: float,
        poll: float = 0.01,
    ) -> bool:
        """Reserve n samples, waiting up to ``timeout`` s for inserts.

        counts(refresh) -> (inserted_total, size) over all shards; ``refresh``
        asks for fresh figures (cached ones are fine on the first try).
        Returns False on timeout.
        """
        if self.try_acquire(n, *counts(False)):
            return True
        start = time.monotonic()
        deadline = start + timeout
        delay = poll
        try:
            while True:
                if self.try_acquire(n, *counts(True)):
                    return True
                now = time.monotonic()
                if now >= deadline:
                    return False
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 1.5, 0.1)
        finally:
            with self._lock:
                self.waited_s += time.monotonic() - start
