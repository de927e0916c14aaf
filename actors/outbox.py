"""What an actor has produced and the replay has not stored yet: pushes, outages, pacing.

Call order (from the actor's loop, one thread)::

    box = ReplayOutbox(url, codec, limit, actor_index, refs=...)
    box.add_frames(counters, frames)   # every step: the E new frames, local counters
    box.add(batch)                     # transitions whose ids are local counters
    allowance = box.flush(policy_version)       # every push_every steps: one round trip
    if allowance is not None:                   # (pushed, budget) after a good push
        box.throttle(allowance, stop, on_wait)  # waits while ahead of the insert budget

Frame ids: the actor numbers frames with a local counter; a push turns counters
into global ids ``make_frame_id(writer.incarnation, counter)`` (see
`common.types`), so an actor acts before the replay is reachable, and a writer
that registers again (a new incarnation after Redis lost its data, see
`replay_server.writer`) simply pushes the rest under its new ids.

While the replay is unavailable (down, refusing writes, reset) nothing is lost
up to ``limit`` transitions: they stay here and the push is retried with
exponential backoff (``BACKOFF_START_S`` doubling to ``BACKOFF_MAX_S``) while the
envs keep running. Beyond ``limit`` the oldest are dropped and counted
(``dropped``). Frames are kept while anything may still refer to them: the
buffered transitions, and what ``refs()`` reports (the actor's current stacks,
n-step windows and pending transitions); older frames are dropped with the
transitions that needed them.

Not thread-safe (the actor's loop thread); `stats` may be read from another
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.types import COUNTER_BITS, FRAME_SHAPE, TransitionBatch
from replay_server.protocol import ReplayUnavailable
from replay_server.writer import ReplayWriter

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
THROTTLE_POLL_S = 0.05
THROTTLE_MAX_S = 5.0


@dataclass
class OutboxStats:
    """Counters of one outbox (transitions unless named otherwise).

    pushed:       stored in the replay's incoming list (acknowledged by Redis)
    dropped:      dropped because the buffer was full during an outage
    buffered:     waiting here now
    pushes:       successful pushes (round trips)
    push_failed:  failed push attempts (each one outage retry)
    resets:       times the replay lost its data and the writer registered again
    replay_ok:    the last attempt succeeded
    incarnation:  the writer's current incarnation (None before the first connection)
    """

    pushed: int = 0
    dropped: int = 0
    buffered: int = 0
    pushes: int = 0
    push_failed: int = 0
    resets: int = 0
    replay_ok: bool = True
    incarnation: int | None = None


class ReplayOutbox:
    """Buffers one actor's frames and transitions and pushes them to one shard.

    url, codec:  the shard's Redis and the frame codec (`ReplayWriter`)
    limit:       transitions kept while the replay is unavailable
    actor_index: tags pushes (and log lines)
    refs:        ``() -> list[int64 arrays]`` of frame ids (local counters) the actor
                 may still put into a future transition
    """

    def __init__(
        self,
        url: str,
        codec: str,
        limit: int,
        actor_index: int,
        refs: Callable[[], list[np.ndarray]],
    ) -> None:
        self.url, self.codec, self.limit, self.actor = url, codec, int(limit), actor_index
        self._refs = refs
        self._frames: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (counters, frames)
        self._trans: deque[TransitionBatch] = deque()  # ids are local counters
        self._writer: ReplayWriter | None = None
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._failing_since: float | None = None
        self._lock = threading.Lock()  # guards the counters read by stats()
        self._s = OutboxStats()
        self.time = {"encode": 0.0, "push": 0.0, "throttle": 0.0}

    # ---- the actor's side ------------------------------------------------------
    def add_frames(self, counters: np.ndarray, frames: np.ndarray) -> None:
        """New frames: int64[m] local counters, uint8[m, 84, 84] (copied)."""
        self._frames.append((counters, frames.copy()))

    def add(self, batch: TransitionBatch) -> None:
        """Transitions whose frame ids are local counters."""
        if len(batch):
            self._trans.append(batch)
            with self._lock:
                self._s.buffered += len(batch)

    @property
    def incarnation(self) -> int | None:
        return self._writer.incarnation if self._writer is not None else None

    def base(self) -> np.int64:
        """What local counters are OR-ed with to become global frame ids (0 before
        the first connection)."""
        inc = self.incarnation
        return np.int64(inc) << np.int64(COUNTER_BITS) if inc is not None else np.int64(0)

    def stats(self) -> OutboxStats:
        with self._lock:
            s = OutboxStats(**vars(self._s))
        s.incarnation = self.incarnation
        return s

    def connect(self) -> bool:
        """Make sure there is a writer (registers once); False while unavailable."""
        if self._writer is not None:
            return True
        try:
            self._writer = ReplayWriter(self.url, codec=self.codec)
        except ReplayUnavailable as exc:
            self._note_failure(exc)
            return False
        return True

    def flush(self, policy_version: int, force: bool = False) -> tuple[int, int | None] | None:
        """Push everything queued in one round trip, or keep it (bounded) for a retry.

        Returns the writer's ``(pushed, budget)`` after a successful push (see
        `throttle`), None when nothing was pushed. ``force`` ignores the backoff.
        """
        if not self._trans:
            return None
        if (time.monotonic() < self._retry_at and not force) or not self.connect():
            self._bound()
            return None
        t0 = time.perf_counter()
        base = self.base()
        if self._frames:
            counters = np.concatenate([c for c, _ in self._frames])
            frames = np.concatenate([f for _, f in self._frames])
        else:
            counters, frames = np.zeros(0, np.int64), np.zeros((0, *FRAME_SHAPE), np.uint8)
        batch = TransitionBatch.concat(list(self._trans))
        batch.obs_ids = batch.obs_ids | base
        batch.next_obs_ids = batch.next_obs_ids | base
        t1 = time.perf_counter()
        try:
            allowance = self._writer.push(
                counters | base, frames, batch, self.actor, policy_version
            )
        except ReplayUnavailable as exc:
            self.time["encode"] += t1 - t0
            self.time["push"] += time.perf_counter() - t1
            self._note_failure(exc)
            self._bound()
            return None
        t2 = time.perf_counter()
        if self._failing_since is not None:
            log.warning(
                "actor %d: replay reachable again after %.1fs; pushed %d buffered transitions",
                self.actor, time.monotonic() - self._failing_since, len(batch),
            )  # fmt: skip
        self._frames.clear()
        self._trans.clear()
        with self._lock:
            self.time["encode"] += t1 - t0
            self.time["push"] += t2 - t1
            self._s.pushed += len(batch)
            self._s.pushes += 1
            self._s.buffered = 0
            self._s.replay_ok = True
        self._failing_since = None
        self._backoff = BACKOFF_START_S
        self._retry_at = 0.0
        return allowance

    def throttle(
        self,
        allowance: tuple[int, int | None],
        stop: threading.Event,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        """Wait while this shard's writers are ahead of the learner's insert budget.

        The learner keeps ``budget`` near ``sampled / samples_per_insert`` plus a
        tolerance (`replay_server.rate_limiter.InsertBudget`), so adding actors
        does not change the replay ratio. The wait is bounded by ``THROTTLE_MAX_S``
        per push, so a stalled learner never stops the actors for good; ``stop``
        ends it at once; ``on_wait`` runs every poll (the actor takes new weights).
        """
        pushed, budget = allowance
        if budget is None or pushed <= budget or self._writer is None:
            return
        t0 = time.perf_counter()
        deadline = time.monotonic() + THROTTLE_MAX_S
        while pushed > budget and not stop.is_set() and time.monotonic() < deadline:
            stop.wait(THROTTLE_POLL_S)
            if on_wait is not None:
                on_wait()
            try:
                pushed, budget = self._writer.allowance()
            except ReplayUnavailable:
                break
            if budget is None:
                break
        with self._lock:
            self.time["throttle"] += time.perf_counter() - t0

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    # ---- outages ----------------------------------------------------------------
    def _note_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        reset = self._writer is not None and self._writer.resets > self._s.resets
        with self._lock:
            self._s.push_failed += 1
            self._s.replay_ok = False
            if reset:
                self._s.resets = self._writer.resets
            first = self._failing_since is None
            if first:
                self._failing_since = now
        if reset:  # re-registered already: retry at once under the new ids
            log.warning("actor %d: %s", self.actor, exc)
            self._retry_at = 0.0
            return
        self._retry_at = now + self._backoff
        if first or self._backoff >= BACKOFF_MAX_S:
            log.warning(
                "actor %d: replay unavailable (%s); buffering up to %d transitions locally, "
                "retrying in %.2fs (%d buffered, %d dropped so far)",
                self.actor, exc, self.limit, self._backoff, self._s.buffered, self._s.dropped,
            )  # fmt: skip
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)

    def _bound(self) -> None:
        """Drop the oldest transitions beyond ``limit``, then the frames nobody needs."""
        dropped = 0
        buffered = self._s.buffered
        while buffered - dropped > self.limit:
            oldest = self._trans[0]
            excess = buffered - dropped - self.limit
            if len(oldest) <= excess:
                self._trans.popleft()
                dropped += len(oldest)
            else:
                self._trans[0] = _tail(oldest, excess)
                dropped += excess
        if dropped:
            with self._lock:
                self._s.dropped += dropped
                self._s.buffered -= dropped
        refs = [r.reshape(-1) for r in self._refs()]
        refs += [t.obs_ids.reshape(-1) for t in self._trans]
        sizes = [r for r in refs if r.size]
        if not sizes:
            return
        oldest_needed = min(int(r.min()) for r in sizes)
        while self._frames and self._frames[0][0][-1] < oldest_needed:
            self._frames.popleft()


def _tail(batch: TransitionBatch, start: int) -> TransitionBatch:
    return TransitionBatch(
        obs_ids=batch.obs_ids[start:],
        next_obs_ids=batch.next_obs_ids[start:],
        actions=batch.actions[start:],
        returns=batch.returns[start:],
        discounts=batch.discounts[start:],
        priorities=batch.priorities[start:],
    )
