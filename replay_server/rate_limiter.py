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

One object owns both: `ReplayRatioKeeper` (built once by the launcher, handed to
`replay_server.sampler.ReplaySampler`). The sampler reserves rows from its
limiter and reports delivered rows to it (`ReplayRatioKeeper.delivered`, where
batches are delivered); its own thread writes the budgets from that count, so a
Redis that is down never stalls delivery.

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
from typing import Protocol

import redis

from replay_server.endpoints import ShardEndpoint
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

    shards: the run's `replay_server.endpoints.ShardEndpoint` s; one connection
    to each is opened here (`ReplayUnavailable` when one cannot be reached) and
    owned here.
    """

    def __init__(
        self, shards: Sequence[ShardEndpoint], ratio: ReplayRatio, batch_size: int
    ) -> None:
        self.keys = ReplayKeys(shards[0].namespace)
        self.clients: list[redis.Redis] = []
        try:
            for ep in shards:
                self.clients.append(ep.connect())
        except BaseException:
            for c in self.clients:
                c.close()
            raise
        self.where, self.ratio = [ep.where for ep in shards], ratio
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


class _Budget(Protocol):
    def update(self, sampled: int) -> None: ...
    def close(self) -> None: ...


class ReplayRatioKeeper:
    """The one owner of the replay ratio: the learner side (``limiter``, a
    `RateLimiter`) and the insert side (``budget``, an `InsertBudget`, or None
    when no writers are throttled, as in tests and benches).

    The sampler reserves and gives back rows on ``limiter`` and calls
    :meth:`delivered` with every batch it delivers; that count drives the insert
    budget. The budget is written by a daemon thread (`start`), woken by
    deliveries and at most every ``interval`` s, so the data path never waits on
    a Redis round trip (or on a Redis that is down).
    """

    def __init__(
        self,
        ratio: ReplayRatio,
        tolerance: float | None = None,
        budget: _Budget | None = None,
        interval: float = 0.25,
    ) -> None:
        self.ratio = ratio
        self.limiter = RateLimiter(ratio.min_size, ratio.samples_per_insert, tolerance)
        self.budget = budget
        self.interval = float(interval)
        self.sampled = 0  # rows delivered to the learner
        self.budget_updates = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def delivered(self, n: int) -> None:
        """``n`` rows reached the learner (called where batches are delivered)."""
        with self._lock:
            self.sampled += int(n)
        self._wake.set()

    def start(self) -> ReplayRatioKeeper:
        """Start writing the insert budget (no-op without one). Returns self."""
        if self.budget is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="insert-budget", daemon=True)
            self._thread.start()
        return self

    def update_budget(self) -> None:
        """Write the budget for the rows delivered so far (what the thread does)."""
        if self.budget is not None:
            with self._lock:
                sampled = self.sampled
            self.budget.update(sampled)
            self.budget_updates += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)  # a periodic write too: a Redis back from an outage
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.update_budget()
            except Exception:  # a bug: keep the ratio alive, say so
                log.exception("insert budget update failed")
            self._stop.wait(self.interval)

    def close(self) -> None:
        """Stop the thread and remove the budgets (writers are no longer held)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self.budget is not None:
            self.budget.close()
