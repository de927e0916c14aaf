"""What an actor has produced and the replay has not stored yet: pushes, outages, pacing.

Call order (from the actor's loop, one thread)::

    box = ReplayOutbox(url, codec, limit_bytes, actor_index, refs=...)
    box.add_frames(counters, frames)   # every step: the E new frames, local counters
    box.add(batch)                     # transitions whose ids are local counters
    box.seal(policy_version)           # every push_every steps: hand them to the pusher
    box.throttle(stop, on_wait)        # waits (bounded) while ahead of the insert budget
    ...
    box.drain(timeout)                 # at the end of a run: wait for the pushes (bounded)
    box.close(timeout)                 # push what it can, count the rest as dropped

**The env loop never waits on Redis.** `seal` compresses the new frames with the
replay's frame codec and queues them, with the transitions, as one `Sealed`
push; a pusher thread (started with the first `seal`) pushes the sealed pushes
in order, one round trip each (`replay_server.writer.ReplayWriter.push`).
`throttle` reads the insert budget the pusher last saw (the pusher refreshes it
while the actor waits), so a Redis that hangs (a partition, a SIGSTOPped
server) stalls only the pusher.

**Pushes are idempotent.** Each sealed push has an id; a push whose outcome is
unknown (its reply was lost: a timeout, a reset connection) is retried with the
same id before any later one, and Redis stores a push id of a writer once.

**Outages.** While the replay is unavailable (down, refusing writes, hung) the
sealed pushes stay here, compressed, and the head one is retried with
exponential backoff (``BACKOFF_START_S`` doubling to ``BACKOFF_MAX_S``).
Their size is bounded in bytes (``limit_bytes``: encoded frames plus transition
arrays): beyond it the oldest waiting pushes are dropped and their transitions
counted (``dropped``); their frames that later transitions, or the actor's
stacks and n-step windows (``refs()``, read at each `seal`), still refer to
move to the next push instead.

Frame ids: the actor numbers frames with a local counter; a push turns counters
into global ids ``make_frame_id(writer.incarnation, counter)`` (see
`common.types`), so an actor acts before the replay is reachable, and a writer
that registers again (a new incarnation after Redis lost its data, see
`replay_server.writer`) pushes the rest under its new ids.

`stats` may be read from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.types import COUNTER_BITS, TransitionBatch
from common.wire import FrameCodec, WireError, train_zstd_dictionary
from replay_server.protocol import ReplayUnavailable
from replay_server.writer import DICT_MIN_FRAMES, ReplayWriter, load_dictionary

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
THROTTLE_POLL_S = 0.05
THROTTLE_MAX_S = 5.0
REPLY_TIMEOUT_S = 30.0  # a push unanswered this long is an outage (then retried)


@dataclass
class OutboxStats:
    """Counters of one outbox (transitions unless named otherwise).

    pushed:          stored in the replay's incoming list (acknowledged by Redis)
    dropped:         dropped: the buffer was full during an outage, or still held
                     when the outbox closed
    buffered:        waiting here now (sealed or not)
    buffered_bytes:  bytes the sealed pushes waiting here hold (the bounded part)
    pushes:          successful pushes (round trips)
    push_failed:     failed push attempts (each one outage retry)
    duplicates:      retried pushes Redis had stored already (their reply was lost)
    resets:          times the replay lost its data and the writer registered again
    replay_ok:       the last attempt succeeded
    incarnation:     the writer's current incarnation (None before the first connection)
    """

    pushed: int = 0
    dropped: int = 0
    buffered: int = 0
    buffered_bytes: int = 0
    pushes: int = 0
    push_failed: int = 0
    duplicates: int = 0
    resets: int = 0
    replay_ok: bool = True
    incarnation: int | None = None


@dataclass
class Sealed:
    """One push, sealed by the actor's loop: new frames (encoded) and transitions,
    ids as local counters; ``push_id`` stays the same over its retries."""

    push_id: int
    counters: np.ndarray  # int64[m]
    blobs: list[bytes]  # the m encoded frames
    batch: TransitionBatch
    policy_version: int

    @property
    def nbytes(self) -> int:
        arrays = (getattr(self.batch, f) for f in TransitionBatch.__dataclass_fields__)
        return (
            sum(len(b) for b in self.blobs) + self.counters.nbytes + sum(a.nbytes for a in arrays)
        )


class ReplayOutbox:
    """Buffers one actor's frames and transitions and pushes them to one shard.

    url, codec:   the shard's Redis and the frame codec (`ReplayWriter`)
    limit_bytes:  bytes of sealed pushes kept while the replay is unavailable
    actor_index:  tags pushes (and log lines)
    refs:         ``() -> list[int64 arrays]`` of frame ids (local counters) the
                  actor may still put into a future transition (called by `seal`,
                  in the actor's thread)
    reply_timeout: seconds a push may wait for its reply
    """

    def __init__(
        self,
        url: str,
        codec: str,
        limit_bytes: int,
        actor_index: int,
        refs: Callable[[], list[np.ndarray]],
        reply_timeout: float = REPLY_TIMEOUT_S,
    ) -> None:
        self.url, self.codec, self.limit, self.actor = url, codec, int(limit_bytes), actor_index
        self.reply_timeout = float(reply_timeout)
        self._refs = refs
        # the actor's side (its thread only): what the next seal takes
        self._frames: list[tuple[np.ndarray, np.ndarray]] = []  # (counters, frames)
        self._trans: list[TransitionBatch] = []  # ids are local counters
        self._next_id = 0
        self._dict_sample: list[np.ndarray] = []  # zstd-dict: raw frames to train on
        self._frame_codec = None if codec == "zstd-dict" else FrameCodec(codec)
        # shared with the pusher thread, under _cond
        self._cond = threading.Condition()
        self._queue: deque[Sealed] = deque()
        self._inflight: Sealed | None = None
        self._allowance: tuple[int, int | None] | None = None
        self._throttling = False
        self._closing = False
        self._retry_at = 0.0  # monotonic time of the next attempt after a failure
        self._s = OutboxStats()
        self._writer: ReplayWriter | None = None
        self._thread: threading.Thread | None = None
        self._failing_since: float | None = None
        self._backoff = BACKOFF_START_S
        self.time = {"encode": 0.0, "push": 0.0, "throttle": 0.0}

    # ---- the actor's side ------------------------------------------------------
    def add_frames(self, counters: np.ndarray, frames: np.ndarray) -> None:
        """New frames: int64[m] local counters, uint8[m, 84, 84] (copied)."""
        self._frames.append((counters, frames.copy()))

    def add(self, batch: TransitionBatch) -> None:
        """Transitions whose frame ids are local counters."""
        if len(batch):
            self._trans.append(batch)
            with self._cond:
                self._s.buffered += len(batch)

    @property
    def incarnation(self) -> int | None:
        w = self._writer
        return w.incarnation if w is not None else None

    def base(self) -> np.int64:
        """What local counters are OR-ed with to become global frame ids (0 before
        the first connection)."""
        inc = self.incarnation
        return np.int64(inc) << np.int64(COUNTER_BITS) if inc is not None else np.int64(0)

    def stats(self) -> OutboxStats:
        with self._cond:
            s = OutboxStats(**vars(self._s))
        s.incarnation = self.incarnation
        return s

    def connect(self) -> bool:
        """Make sure there is a writer (registers once); False while unavailable.
        The actor calls it once at start (for its incarnation); afterwards only
        the pusher thread does."""
        if self._writer is not None:
            return True
        try:
            self._writer = ReplayWriter(
                self.url, codec=self.codec, reply_timeout=self.reply_timeout
            )
        except ReplayUnavailable as exc:
            self._note_failure(exc)
            return False
        return True

    def seal(self, policy_version: int) -> None:
        """Hand everything added since the last seal to the pusher as one push
        (frames compressed here); never waits on Redis. Drops the oldest waiting
        pushes beyond ``limit_bytes``."""
        if not self._trans:
            return
        t0 = time.perf_counter()
        counters = [c for c, _ in self._frames]
        frames = np.concatenate([f for _, f in self._frames]) if self._frames else None
        blobs = self._encode(frames) if frames is not None else []
        counters = np.concatenate(counters) if counters else np.zeros(0, np.int64)
        unit = Sealed(
            self._next_id, counters, blobs, TransitionBatch.concat(self._trans), policy_version
        )
        self._next_id += 1
        self._frames.clear()
        self._trans.clear()
        floor = _min_id(self._refs())  # no future transition refers to older frames
        with self._cond:
            self._queue.append(unit)
            self._s.buffered_bytes += unit.nbytes
            self._bound(floor)
            self.time["encode"] += time.perf_counter() - t0
            self._cond.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"replay-pusher-{self.actor}", daemon=True
            )
            self._thread.start()

    def throttle(self, stop: threading.Event, on_wait: Callable[[], None] | None = None) -> None:
        """Wait while this shard's writers are ahead of the learner's insert budget.

        The learner keeps ``budget`` near ``sampled / samples_per_insert`` plus a
        tolerance (`replay_server.rate_limiter.InsertBudget`), so adding actors
        does not change the replay ratio. The figures are the ones the pusher saw
        last (it refreshes them meanwhile), so this never waits on Redis itself;
        the wait is bounded by ``THROTTLE_MAX_S``, so a stalled learner never
        stops the actors for good; ``stop`` ends it at once; ``on_wait`` runs every
        poll (the actor takes new weights).
        """
        if not self._ahead():
            return
        t0 = time.perf_counter()
        deadline = time.monotonic() + THROTTLE_MAX_S
        with self._cond:
            self._throttling = True
            self._cond.notify_all()
        try:
            while self._ahead() and not stop.is_set() and time.monotonic() < deadline:
                stop.wait(THROTTLE_POLL_S)
                if on_wait is not None:
                    on_wait()
        finally:
            with self._cond:
                self._throttling = False
                self.time["throttle"] += time.perf_counter() - t0

    def drain(self, timeout: float) -> bool:
        """Push what is sealed now, without waiting out a backoff: wait until it is
        stored (True), an attempt fails, or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            failed = self._s.push_failed
            self._retry_at = 0.0
            self._cond.notify_all()
            while self._queue or self._inflight is not None:
                left = deadline - time.monotonic()
                if left <= 0 or (self._s.push_failed > failed and self._inflight is None):
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self, timeout: float = 0.0) -> None:
        """Stop the pusher after up to ``timeout`` s of pushing what is sealed; what
        is still here then is counted as dropped (and logged)."""
        if timeout > 0:
            self.drain(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)  # a push hung on a partition: leave it
        with self._cond:
            left = self._s.buffered
            self._s.dropped += left
            self._s.buffered = 0
            self._s.buffered_bytes = 0
            self._queue.clear()
        if left:
            log.warning(
                "actor %d: %d transitions not stored at close (counted as dropped)",
                self.actor,
                left,
            )
        if self._writer is not None:
            self._writer.close()

    # ---- the pusher thread ------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing:
                    now = time.monotonic()
                    if self._queue and now >= self._retry_at:
                        break
                    if self._throttling and not self._queue and self._writer is not None:
                        break
                    wait = self._retry_at - now if self._queue else THROTTLE_POLL_S
                    self._cond.wait(min(wait, 1.0))
                if self._closing:
                    return
                unit = self._queue.popleft() if self._queue else None
                self._inflight = unit
            if unit is None:  # the actor waits for the budget: refresh it
                self._refresh_allowance()
                continue
            ok, retry_now = self._push(unit)
            with self._cond:
                self._inflight = None
                if not ok:
                    self._queue.appendleft(unit)
                    self._retry_at = 0.0 if retry_now else time.monotonic() + self._backoff_step()
                self._cond.notify_all()

    def _push(self, unit: Sealed) -> tuple[bool, bool]:
        """One attempt: (stored, retry at once)."""
        if not self.connect():
            return False, False
        t0 = time.perf_counter()
        writer = self._writer
        base = self.base()
        batch = TransitionBatch(
            obs_ids=unit.batch.obs_ids | base,
            next_obs_ids=unit.batch.next_obs_ids | base,
            actions=unit.batch.actions,
            returns=unit.batch.returns,
            discounts=unit.batch.discounts,
            priorities=unit.batch.priorities,
        )
        try:
            self._train_dictionary(writer)
            allowance = writer.push(
                unit.counters | base, None, batch, self.actor, unit.policy_version,
                push_id=unit.push_id, blobs=unit.blobs,
            )  # fmt: skip
        except ReplayUnavailable as exc:
            self.time["push"] += time.perf_counter() - t0
            return False, self._note_failure(exc)
        if self._failing_since is not None:
            log.warning(
                "actor %d: replay reachable again after %.1fs",
                self.actor, time.monotonic() - self._failing_since,
            )  # fmt: skip
        with self._cond:
            self.time["push"] += time.perf_counter() - t0
            self._allowance = allowance
            self._s.pushed += len(unit.batch)
            self._s.pushes += 1
            self._s.duplicates = writer.duplicates
            self._s.buffered -= len(unit.batch)
            self._s.buffered_bytes -= unit.nbytes
            self._s.replay_ok = True
        self._failing_since = None
        self._backoff = BACKOFF_START_S
        return True, True

    def _refresh_allowance(self) -> None:
        try:
            allowance = self._writer.allowance()
        except ReplayUnavailable:
            allowance = None  # the actor stops waiting: the budget is unknown
        with self._cond:
            self._allowance = allowance
            self._cond.notify_all()
        time.sleep(THROTTLE_POLL_S)

    def _ahead(self) -> bool:
        a = self._allowance
        return a is not None and a[1] is not None and a[0] > a[1]

    # ---- frames ------------------------------------------------------------------
    def _encode(self, frames: np.ndarray) -> list[bytes]:
        codec = self._frame_codec
        if codec is None:  # zstd-dict before its dictionary: plain zstd (readers take both)
            if len(self._dict_sample) * len(frames) < 4 * DICT_MIN_FRAMES:
                self._dict_sample.append(frames)
            codec = FrameCodec("zstd")
        return codec.encode(frames)

    def _train_dictionary(self, writer: ReplayWriter) -> None:
        """zstd-dict: take the replay's dictionary, or train it from the frames seen
        (the first writer with enough frames sets it), in the pusher thread."""
        if self._frame_codec is not None or not self._dict_sample:
            return
        d = load_dictionary(writer.client, writer.keys)
        sample = list(self._dict_sample)
        if d is None and sum(len(f) for f in sample) >= DICT_MIN_FRAMES:
            try:
                writer.client.setnx(
                    writer.keys.dictionary, train_zstd_dictionary(np.concatenate(sample)[-4096:])
                )
            except WireError:
                return  # too uniform; keep collecting
            d = load_dictionary(writer.client, writer.keys)
        if d is not None:
            self._frame_codec = FrameCodec("zstd-dict", d)
            self._dict_sample = []

    # ---- outages -----------------------------------------------------------------
    def _note_failure(self, exc: BaseException) -> bool:
        """Count a failed attempt; True when the push should be retried at once (the
        writer registered again)."""
        now = time.monotonic()
        reset = self._writer is not None and self._writer.resets > self._s.resets
        with self._cond:
            self._s.push_failed += 1
            self._s.replay_ok = False
            if reset:
                self._s.resets = self._writer.resets
            first = self._failing_since is None
            if first:
                self._failing_since = now
            buffered, dropped = self._s.buffered, self._s.dropped
        if reset:  # re-registered already: retry at once under the new ids
            log.warning("actor %d: %s", self.actor, exc)
            return True
        if first or self._backoff >= BACKOFF_MAX_S:
            log.warning(
                "actor %d: replay unavailable (%s); buffering up to %s locally, "
                "retrying in %.2fs (%d transitions buffered, %d dropped so far)",
                self.actor, exc, _size(self.limit), self._backoff, buffered, dropped,
            )  # fmt: skip
        return False

    def _backoff_step(self) -> float:
        wait = self._backoff
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)
        return wait

    def _bound(self, floor: int | None) -> None:
        """(Under _cond.) Drop the oldest waiting pushes while the sealed bytes are
        over ``limit`` (the newest one always stays); their frames that anything may
        still refer to move to the next push."""
        dropped = 0
        while self._s.buffered_bytes > self.limit and len(self._queue) > 1:
            old = self._queue.popleft()
            self._s.buffered_bytes -= old.nbytes
            dropped += len(old.batch)
            needed = [u.batch.obs_ids.min() for u in self._queue if len(u.batch)]
            if floor is not None:
                needed.append(floor)
            keep = old.counters >= min(needed) if needed else np.zeros(len(old.counters), bool)
            if keep.any():
                nxt = self._queue[0]
                idx = np.flatnonzero(keep)
                moved = [old.blobs[i] for i in idx]
                nxt.counters = np.concatenate([old.counters[idx], nxt.counters])
                nxt.blobs = moved + nxt.blobs
                self._s.buffered_bytes += sum(len(b) for b in moved) + 8 * len(idx)
        if dropped:
            self._s.dropped += dropped
            self._s.buffered -= dropped


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MB" if nbytes >= 2**20 else f"{nbytes / 1024:.0f} KB"


def _min_id(arrays: list[np.ndarray]) -> int | None:
    sizes = [a for a in arrays if a.size]
    return min(int(a.min()) for a in sizes) if sizes else None
