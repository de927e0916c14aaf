"""Keep the learner's sampling rate and the actors' insert rate at one ratio.

Reverb's ``SampleToInsertRatio``, held from both sides with one formula
(`ReplayRatio`): with ``R = samples_per_insert``,

    samples allowed after ``inserted`` inserts:  R * (inserted - min_size)
    inserts allowed after ``sampled`` samples:   min_size + sampled / R

* the learner side (`RateLimiter`): a batch of ``n`` may be drawn while
  ``sampled + n <= allowed_samples(inserted) + tolerance`` (the learner waits);
* the insert side (`InsertBudget`): each shard's Redis holds a budget of
  ``allowed_inserts(sampled) + tolerance`` (split over the shards); writers that
  pushed more wait, bounded (`actors.outbox.ReplayOutbox.throttle`). Unlike the
  paper's free-running actors: with few actors the learner is the bottleneck, and
  unthrottled actors would make the effective ratio depend on the machine.

``R = 0`` disables both (only ``min_size`` holds). Whenever sampling opens
(the first check with ``min_size`` stored, and again after a replay that lost
its data has been refilled), the learner's ``sampled`` is credited as if it had
kept the ratio all along: a resumed run against a full replay, or a learner
that waited for a refill while ``inserted`` (cumulative) grew, gets no burst.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis

from replay_server.keys import ReplayKeys
from replay_server.protocol import ReplayUnavailable, replay_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayRatio:
    """The replay ratio R = samples per insert, after ``min_size`` inserts (R = 0: off)."""

    samples_per_insert: float
    min_size: int

    def allowed_samples(self, inserted: int) -> float:
        """Samples the learner may have drawn after ``inserted`` inserts."""
        return self.samples_per_insert * (inserted - self.min_size)

    def allowed_inserts(self, sampled: float) -> float:
        """Inserts the actors may have made after the learner drew ``sampled``."""
        return self.min_size + sampled / self.samples_per_insert


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
        self.ratio = ReplayRatio(self.samples_per_insert, self.min_size)
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
            self._credited = False  # at the start, or the replay lost its data
            return False
        spi = self.samples_per_insert
        if spi <= 0:
            return True
        if not self._credited:
            self.sampled = max(self.sampled, self.ratio.allowed_samples(inserted))
            self._credited = True
        tol = self.tolerance if self.tolerance is not None else 2.0 * n
        return self.sampled + n <= self.ratio.allowed_samples(inserted) + tol

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


class InsertBudget:
    """The insert side of the replay ratio (the `RateLimiter` holds the other).

    Every `update`, each shard's Redis gets ``budget = pushed_at_start +
    (allowed_inserts(sampled) + tolerance) / shards``; writers that pushed more
    wait (bounded) before their next push. Tolerance: 20 batches' worth of
    inserts, at least 1,000, so that actors run smoothly between updates.
    Off (the key deleted) when R = 0. A shard whose Redis is unavailable keeps
    its last budget until it is back (writers there buffer anyway).

    A Redis that lost its data (its ``epoch`` key changed or vanished) starts
    its ``pushed`` counter again at 0, so that shard's budget starts again too,
    as at the start of a run: ``pushed_now + (allowed_inserts(sampled -
    sampled_then) + tolerance) / shards``, i.e. a refill of ``min_size / shards``
    and then the ratio. (Keeping the old base would let writers push the whole
    lost history again unthrottled.)

    clients: one connected ``redis.Redis`` per shard (`connect`), owned here.
    """

    def __init__(
        self,
        clients: Sequence[redis.Redis],
        where: Sequence[str],
        ratio: ReplayRatio,
        batch_size: int,
        namespace: str = "apex",
    ) -> None:
        self.keys = ReplayKeys(namespace)
        self.clients, self.where, self.ratio = list(clients), list(where), ratio
        r = ratio.samples_per_insert
        self.tolerance = max(1000.0, 20 * batch_size / r) if r > 0 else 0.0
        n = len(self.clients)
        # Per shard: `pushed` when its budget (re)started, the learner's `sampled`
        # then, and the epoch of the data it counts (None: not seen yet / empty).
        self.base: list[int | None] = [None] * n
        self.sampled_at_base: list[float] = [0.0] * n
        self.epoch: list[bytes | None] = [None] * n
        self.restarts = 0  # budgets started again because a Redis lost its data
        self.update(0)

    def update(self, sampled: int) -> None:
        r = self.ratio.samples_per_insert
        for k, client in enumerate(self.clients):
            try:
                with replay_errors(self.where[k]):
                    if r <= 0:
                        client.delete(self.keys.budget)
                        continue
                    epoch, pushed = client.mget([self.keys.epoch, self.keys.pushed])
                    self._rebase(k, epoch, int(pushed or 0), sampled)
                    own = self.ratio.allowed_inserts(sampled - self.sampled_at_base[k])
                    share = (own + self.tolerance) / len(self.clients)
                    client.set(self.keys.budget, int(self.base[k] + share))
            except ReplayUnavailable:
                continue  # writers of that shard cannot push now either

    def _rebase(self, k: int, epoch: bytes | None, pushed: int, sampled: float) -> None:
        if self.base[k] is None:  # first sight of this shard's Redis
            self.base[k], self.epoch[k] = pushed, epoch
        elif epoch != self.epoch[k] and (epoch is None or self.epoch[k] is not None):
            # its data is gone (epoch vanished, or replaced by another one without us
            # seeing it vanish); a first epoch set after a vanished one is the refill
            # we already started, not a second loss
            log.warning(
                "insert budget of %s starts again: its Redis lost its data "
                "(writers may refill %d transitions, then the ratio holds)",
                self.where[k],
                self.ratio.min_size // len(self.clients),
            )
            self.base[k], self.sampled_at_base[k] = pushed, float(sampled)
            self.restarts += 1
        self.epoch[k] = epoch

    def close(self) -> None:
        for client in self.clients:
            try:
                client.delete(self.keys.budget)
            except (redis.RedisError, OSError):
                pass  # Redis already gone: nothing left to unblock
            client.close()
