"""One replay shard: the single owner of a Redis-backed prioritized FIFO ring.

Call order::

    shard = ReplayShard(url, capacity)       # loads what the Redis holds (or later)
    shard.start()                            # background ingest, snapshots, GC
    shard.sample(512) -> ShardSample         # any thread (Ray max_concurrency>1)
    shard.update_priorities(keys, prios)
    shard.stop()                             # final snapshot

The shard is the Redis side of three modules:

* `replay_server.records`: the 80-byte record and its checks;
* `replay_server.index`: the pure in-memory index (slots, records, the sum tree
  of ``priority**alpha``, frame lifetimes, counters), which unit tests exercise
  without Redis;
* this module: ingest, load/reload/reset, orphan sweeps, priority snapshots,
  heartbeat and stats, against one Redis.

Storage (key names in :mod:`replay_server.keys`):

* frames: one key per frame, written once by a :class:`ReplayWriter`;
* transitions: monotonic integer *slots*; slot ``s`` lives at position
  ``s % capacity`` of a FIFO ring, as a record in chunk strings of 4,096 records
  (one Redis key per chunk, not per transition: ~0.02 B of key overhead per
  transition instead of ~70);
* frame lifetime: :class:`FrameGroups` (a frame is deleted once eviction has
  passed every slot that refers to it);
* priorities: in memory, snapshotted into Redis every ``snapshot_seconds`` and
  at :meth:`stop`.

Ingest is reliable: a round reads up to 64 pushes with LRANGE (without removing
them), plans the new index on copies (`ReplayIndex.plan`), and writes records,
frame groups, frees, counters *and the LTRIM that removes those pushes* in one
MULTI/EXEC. Only when Redis has accepted it does the in-memory index change
(`ReplayIndex.apply`). A round that fails (Redis
down, ``OOM``, ``MISCONF``, ``READONLY``) changes nothing anywhere and is retried,
so a popped push is never lost and memory never runs ahead of Redis.

Every ingest round also checks that Redis still holds what the index describes
(the namespace's ``epoch`` and ``meta.next_slot``):

* ``meta`` gone: Redis came back empty (a lost volume, a restart without its
  AOF, FLUSHALL). The shard says so loudly, counts the transitions it had
  (``lost_in_resets``), evicts them all (slots stay monotonic) and refills;
  writers registered with the old data cannot write into the new (see
  `replay_server.writer`).
* ``next_slot`` behind the index: Redis lost its newest writes (an older AOF, a
  machine crash: up to ~1-2 s with ``appendfsync everysec``, see
  `replay_server.redis_proc`). The shard reloads its index from
  Redis and counts the transitions that are gone (``lost``).

Validation (nothing from Redis is trusted): a push that does not decode is
counted ``malformed``; a record with an action outside ``[0, num_actions)``, a
non-finite or huge return, a discount outside ``[0, 1]`` or a priority that is
not finite in ``[0, MAX_PRIORITY]``, or a push whose new frames are not one
contiguous run of one registered writer, is counted ``rejected`` and never
stored; a transition whose frames the replay does not hold is ``dangling``. The
reload (`_load`, then `ReplayIndex.load`) is bounded and defensive: bad records get weight 0 (never
sampled), bad group records are dropped (their frames become orphans).

Orphan frames (stored by a writer but referenced by no live transition: left by
a lost ingest window, a malformed push or a reset) are deleted by a sweep at
start and every ``gc_seconds`` (``orphans_collected``).

Why this module is ~700 lines: everything here writes to, or reconciles with,
the shard's Redis under one ingest lock (ingest, load, reload, reset, sweep,
snapshot, the lease), and the invariant "memory never runs ahead of Redis" is easier to
check in one place; the parts that need no Redis are in `replay_server.index`
and `replay_server.records`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import numpy as np
import redis

from common.wire import WireError, decode_batch
from replay_server import lease
from replay_server.frame_groups import FrameGroups
from replay_server.index import Plan, ReplayIndex
from replay_server.keys import ReplayKeys
from replay_server.namespace import NamespaceError, ReplayIdentity, parse_meta
from replay_server.protocol import ReplayUnavailable, ShardSample, ShardStats, replay_errors
from replay_server.records import (
    MAX_ACTIONS,
    RECORD_DTYPE,
    RECORDS_PER_CHUNK,
    chunk_len,
    chunk_runs,
)
from replay_server.redis_proc import connect, redact

log = logging.getLogger(__name__)

BACKOFF_MAX_S = 2.0
HEARTBEAT_S = 1.0
OUTAGE_LOG_EVERY_S = 30.0


class ReplayShard:
    """Prioritized FIFO replay of ``capacity`` transitions in one Redis.

    url:           the shard's Redis (may be down at construction: the shard
                   connects and loads when it can, and samples nothing before)
    capacity:      transitions (per shard)
    identity:      what this namespace must hold (`ReplayIdentity`); written into
                   an empty namespace, checked against a stored one, and its
                   ``num_actions`` bounds stored actions. None: not checked.
    snapshot_seconds / gc_seconds: periods of priority snapshots / orphan sweeps
    autostart:     call :meth:`start` at the end of the constructor (what the Ray
                   wiring does, so a restarted shard actor resumes by itself)
    owner:         the run's lease value (`replay_server.lease.Owner.encode`): the
                   heartbeat refreshes the lease, an ingest commits only while the
                   lease is this value, `stop` gives it back. None: no lease (tests)
    reply_timeout: seconds a Redis call waits for its reply before it is an outage
                   (a hung or partitioned Redis); the connect timeout is at most 5 s

    Thread-safe: ingest, sample, update_priorities and stats may run concurrently.
    Raises `NamespaceError` (construction or reload) when the namespace holds
    another run's data; the launcher checks that before anything starts.
    """

    def __init__(
        self,
        url: str,
        capacity: int,
        alpha: float = 0.6,
        codec: str = "lz4",
        snapshot_seconds: float = 10.0,
        namespace: str = "apex",
        seed: int | None = None,
        identity: ReplayIdentity | None = None,
        gc_seconds: float = 600.0,
        autostart: bool = False,
        owner: str | None = None,
        reply_timeout: float = 30.0,
    ) -> None:
        self.index = ReplayIndex(
            capacity, alpha, identity.num_actions if identity else MAX_ACTIONS, seed
        )
        self.url = url
        self._where = f"Redis at {redact(url)}"
        self.capacity = self.index.capacity
        self.alpha = self.index.alpha
        self.codec = codec
        self.identity = identity
        self.owner = owner
        self.reply_timeout = float(reply_timeout)  # a call with no reply by then: an outage
        self.lease_lost = False  # another run took the replay over (see `_beat`)
        self.snapshot_seconds = float(snapshot_seconds)
        self.gc_seconds = float(gc_seconds)
        self.keys = ReplayKeys(namespace)
        self.pid = os.getpid()
        self.started_at = time.time()
        self._client: redis.Redis | None = None
        self._epoch: bytes | None = None
        self._dict: bytes | None = None  # zstd-dict dictionary, restored after a reset
        self._loaded = False
        self._ingest_lock = threading.RLock()  # one ingest/load/sweep at a time
        self._chunks: set[int] = set()  # record chunks this Redis holds (preallocated)
        # a reload whose load has not succeeded yet (see `_reload`): redone until it does
        self._pending_reload: tuple[dict[str, int], int, int] | None = None
        self.counters = self.index.counters  # the one dict: the index updates it
        self.ingest_errors = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._mem = (0.0, 0)
        self._down_since: float | None = None
        self._down_logged = 0.0
        self._last_snapshot = time.monotonic()
        self._last_beat = 0.0
        self._last_sweep = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        try:
            self._ensure_ready()
        except ReplayUnavailable as exc:
            log.warning("replay shard: %s; connecting in the background", exc)
        if autostart:
            self.start()

    # ---- public API ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self.index.size

    @property
    def inserted_total(self) -> int:
        return self.counters["inserted_total"]

    def ingest(self, max_batches: int = 64) -> int:
        """Move up to max_batches pushes from the incoming list into the replay.

        Returns the number of transitions stored. Raises `ReplayUnavailable`: the
        index is unchanged and the same pushes are read again next time (if the
        round's MULTI did reach Redis before its reply was lost, the next round
        finds Redis's ``next_slot`` ahead of the index and reloads).
        """
        with self._ingest_lock:
            self._ensure_ready()
            k = self.keys
            want_dict = self.codec == "zstd-dict" and self._dict is None
            with replay_errors(self._where):
                pipe = self._client.pipeline(transaction=False)
                pipe.get(k.epoch)
                pipe.hmget(k.meta, ["capacity", "next_slot"])
                pipe.get(k.incarnation)
                pipe.lrange(k.incoming, 0, max_batches - 1)
                if want_dict:
                    pipe.get(k.dictionary)
                epoch, (cap, next_slot), incarnation, raw, *rest = pipe.execute()
            if rest and rest[0] is not None:
                self._dict = rest[0]
            if cap is None:
                self._reset(epoch)
                return 0
            if epoch != self._epoch or int(next_slot or 0) != self.index.next:
                self._reload(epoch, int(next_slot or 0))
                return 0
            if not raw:
                return 0
            plan = self.index.plan(raw, int(incarnation or 0))
            pipe = self._client.pipeline(transaction=True)
            if self.owner is not None:
                self._watch_lease(pipe)
            new_chunks = self._queue_writes(pipe, plan)
            pipe.hset(k.meta, mapping=self.index.meta(plan))
            pipe.ltrim(k.incoming, len(raw), -1)
            try:
                with replay_errors(self._where):
                    pipe.execute()
            except redis.WatchError as exc:
                raise self._watch_failed(exc) from None
            finally:
                pipe.reset()
            self.index.apply(plan)
            self._chunks |= new_chunks
            self._rate.append((time.monotonic(), self.inserted_total))
            return plan.counts.get("inserted_total", 0)

    def sample(self, batch_size: int) -> ShardSample:
        """batch_size transitions drawn with probability p_i**alpha / total.

        Empty arrays (b = 0) when the shard is empty or not loaded yet.
        Importance weights are the sampler's job (they need every shard's totals).
        """
        return self.index.sample(batch_size)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of sampled keys (int64[k] slots), clipped to
        [MIN_PRIORITY, MAX_PRIORITY]; keys of evicted slots and non-finite
        priorities are ignored. Returns how many were applied."""
        return self.index.update_priorities(keys, priorities)

    def remove(self, keys: np.ndarray) -> int:
        """Never sample these slots again (weight 0): rows whose frames are gone
        (counted ``removed``). Returns how many live slots were removed."""
        return self.index.remove(keys)

    def queued(self) -> int:
        """Pushes waiting in the incoming list (0 when Redis cannot be read)."""
        try:
            self._ensure_ready()
            with replay_errors(self._where):
                return int(self._client.llen(self.keys.incoming))
        except (ReplayUnavailable, NamespaceError):
            return 0

    def get_priorities(self, keys: np.ndarray) -> np.ndarray:
        """float32[k] current priorities of keys (NaN for slots no longer stored)."""
        return self.index.get_priorities(keys)

    def stats(self) -> ShardStats:
        """Counters (Redis used_memory cached for 1 s)."""
        now = time.monotonic()
        down = self._down_since
        if self._client is not None and down is None and now - self._mem[0] > 1.0:
            try:
                self._mem = (now, int(self._client.info("memory")["used_memory"]))
            except (redis.RedisError, OSError):
                self._mem = (now, self._mem[1])
        rate = 0.0
        if len(self._rate) >= 2:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / max(t1 - t0, 1e-9)
        c, ix = self.counters, self.index
        with ix.lock:
            return ShardStats(
                size=self.size,
                capacity=self.capacity,
                inserted_total=c["inserted_total"],
                inserts_per_s=rate,
                sampled_total=ix.sampled_total,
                total_priority=ix.tree.total,
                bytes_used=self._mem[1],
                evictions=c["evictions"],
                received=c["received"],
                malformed=c["malformed"],
                rejected=c["rejected"],
                dangling=c["dangling"],
                removed=ix.removed,
                ingest_errors=self.ingest_errors,
                frames_stored=ix.groups.frame_count,
                frame_groups=len(ix.groups),
                lost=c["lost"],
                resets=c["resets"],
                lost_in_resets=c["lost_in_resets"],
                orphans_collected=c["orphans_collected"],
                outages=c["outages"],
                outage_s=c["outage_ms"] / 1000.0 + (now - down if down is not None else 0.0),
                down_s=now - down if down is not None else 0.0,
                available=down is None and self._loaded,
                pid=self.pid,
                started_at=self.started_at,
            )

    def start(self) -> None:
        """Run ingest, snapshots and orphan sweeps in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="replay-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the background thread and write a final priority snapshot (if Redis
        is reachable; otherwise the last periodic one stands)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        try:
            self.snapshot()
        except (ReplayUnavailable, NamespaceError) as exc:
            log.warning("replay shard: no final priority snapshot: %s", exc)
        if self.owner is not None and self._client is not None:
            try:
                lease.release(self._client, self.keys, self.owner)
            except (redis.RedisError, OSError):
                pass  # it ends by itself within lease.LEASE_MS

    def snapshot(self) -> None:
        """Write the priorities of all live slots into Redis (``keys.priorities``)."""
        with self._ingest_lock:
            self._ensure_ready()
            blob = self.index.priorities_blob()
            with replay_errors(self._where):
                self._client.set(self.keys.priorities, blob)
            self._last_snapshot = time.monotonic()

    def sweep_orphans(self) -> int:
        """Delete stored frames that neither a live transition nor a queued push
        refers to. Returns how many were deleted (also ``orphans_collected``)."""
        k = self.keys
        self._ensure_ready()
        with replay_errors(self._where):
            ids = [
                k.frame_id(key)
                for key in self._client.scan_iter(match=k.frame_pattern(), count=2000)
            ]
        if not ids:
            return 0
        found = np.unique(np.asarray(ids, np.int64))
        with self._ingest_lock:  # no ingest between reading the queue and the index
            with replay_errors(self._where):
                queued = self._client.lrange(k.incoming, 0, -1)
            held = [np.zeros(0, np.int64)]
            for item in queued:
                try:
                    held.append(decode_batch(item)[0]["frame_ids"])
                except WireError:
                    continue
            orphan = ~self.index.covered(found)
            orphan &= ~np.isin(found, np.concatenate(held))
            dead = found[orphan]
            if dead.size:
                fk = k.frames(dead)
                with replay_errors(self._where):
                    pipe = self._client.pipeline(transaction=False)
                    for i in range(0, len(fk), 4096):
                        pipe.unlink(*fk[i : i + 4096])
                    pipe.hincrby(k.meta, "orphans_collected", int(dead.size))
                    pipe.execute()
                self.counters["orphans_collected"] += int(dead.size)
                log.info("replay shard: deleted %d orphan frames", dead.size)
        self._last_sweep = time.monotonic()
        return int(dead.size)

    # ---- ingest -------------------------------------------------------------
    def _queue_writes(self, pipe: redis.client.Pipeline, plan: Plan) -> set[int]:
        """Queue a round's records, groups and frees into its MULTI, push by push.
        Returns the record chunks it preallocates (SET NX at full size)."""
        k, new_chunks = self.keys, set()
        for push in plan.pushes:
            for c, off, run in chunk_runs(push.pos):
                if c not in self._chunks and c not in new_chunks:
                    n = chunk_len(self.capacity, c)
                    pipe.set(k.records(c), bytes(n * RECORD_DTYPE.itemsize), nx=True)
                    new_chunks.add(c)
                pipe.setrange(k.records(c), off, push.rec[run].tobytes())
            if push.added is not None:
                gid, gids, gone = push.added
                pipe.hset(k.groups, str(gid), FrameGroups.pack(gids, push.group_created))
                if gone:
                    pipe.hdel(k.groups, *[str(g) for g in gone])
            if push.freed_gids:
                pipe.hdel(k.groups, *[str(g) for g in push.freed_gids])
                fk = k.frames(push.freed)
                for i in range(0, len(fk), 4096):
                    pipe.unlink(*fk[i : i + 4096])
        return new_chunks

    # ---- background ---------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if self._last_sweep == 0.0 or (
                    time.monotonic() - self._last_sweep >= self.gc_seconds
                ):
                    self.sweep_orphans()
                n = self.ingest()
                now = time.monotonic()
                if now - self._last_snapshot >= self.snapshot_seconds:
                    self.snapshot()
                if now - self._last_beat >= HEARTBEAT_S:
                    self._beat()
            except ReplayUnavailable as exc:
                self._note_down(exc, since=began)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            except NamespaceError as exc:
                self.ingest_errors += 1
                log.error("replay shard: %s", exc)
                self._stop.wait(5.0)
                continue
            except Exception:  # a bug: keep the replay alive, say so
                self.ingest_errors += 1
                log.exception("replay shard: ingest round failed")
                self._stop.wait(1.0)
                continue
            backoff = 0.05
            self._note_up()
            if n == 0:
                self._stop.wait(0.005)

    def _beat(self) -> None:
        """Liveness key (and a write: an idle shard notices a Redis refusing writes);
        the run's lease is refreshed with it."""
        with replay_errors(self._where):
            self._client.set(self.keys.heartbeat, f"{self.pid} {time.time():.3f}", ex=10)
            if self.owner is not None and not lease.refresh(self._client, self.keys, self.owner):
                raise self._taken_over()
        self._last_beat = time.monotonic()

    def _watch_lease(self, pipe: redis.client.Pipeline) -> None:
        """Make the round's MULTI conditional on the lease: WATCH it, check it is
        this run's (or free: then the MULTI takes it again), and start the MULTI."""
        try:
            with replay_errors(self._where):
                pipe.watch(self.keys.owner)
                held = pipe.get(self.keys.owner)
        except redis.WatchError as exc:
            raise self._watch_failed(exc) from None
        if held is not None and held != self.owner.encode():
            pipe.reset()
            raise self._taken_over()
        pipe.multi()
        if held is None:  # it expired (this Redis was unreachable for a while)
            pipe.set(self.keys.owner, self.owner, px=lease.LEASE_MS)

    def _watch_failed(self, exc: redis.WatchError) -> ReplayUnavailable | NamespaceError:
        """What a WatchError in a round means. redis-py raises it when the lease
        key changed, but also when the connection broke or a reply timed out while
        the key was watched (a partition, a SIGSTOPped Redis): only the lease, read
        again, tells a takeover from an outage. Nothing was applied to the index
        either way; if the EXEC did reach Redis, the next round sees its
        ``next_slot`` and reloads."""
        with replay_errors(self._where):  # still unreachable: an outage
            held = self._client.get(self.keys.owner)
        if held is not None and held != self.owner.encode():
            return self._taken_over()
        return ReplayUnavailable(f"{self._where} is unavailable: {exc}")

    def _taken_over(self) -> NamespaceError:
        self.lease_lost = True
        held = None
        try:
            held = self._client.get(self.keys.owner)
        except (redis.RedisError, OSError):
            pass
        who = lease.Owner.decode(held) if held is not None else None
        return NamespaceError(
            f"the replay in {self._where} was taken over by another run "
            f"({who.describe() if who else 'unknown'}): this run's lease had expired; "
            "this shard stores nothing more"
        )

    def _note_down(self, exc: BaseException, since: float | None = None) -> None:
        """An outage, noticed now; ``since``: when the failed call began (a hang
        is noticed only when its reply times out, but began before)."""
        self.ingest_errors += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = min(now, since) if since is not None else now
            self._down_logged = now
            self.counters["outages"] += 1
            log.warning("replay shard: %s; retrying (the replay keeps its index)", exc)
        elif now - self._down_logged >= OUTAGE_LOG_EVERY_S:
            self._down_logged = now
            log.warning(
                "replay shard: still unavailable after %.0f s: %s", now - self._down_since, exc
            )

    def _note_up(self) -> None:
        if self._down_since is not None:
            down = time.monotonic() - self._down_since
            self.counters["outage_ms"] += int(1000 * down)
            self._down_since = None
            log.warning("replay shard: %s reachable again after %.1f s", self._where, down)
            # into Redis now, not with the next push: a shard restarted before that
            # would otherwise reload the outage without its length
            c = self.counters
            try:
                self._client.hset(
                    self.keys.meta, mapping={"outages": c["outages"], "outage_ms": c["outage_ms"]}
                )
            except (redis.RedisError, OSError):
                pass  # the next ingest round writes them with the rest

    # ---- load, reload, reset ---------------------------------------------------
    def _ensure_ready(self) -> None:
        if self._loaded:
            return
        with self._ingest_lock:
            if self._loaded:
                return
            if self._client is None:
                self._client = connect(
                    self.url, timeout=min(5.0, self.reply_timeout), reply_timeout=self.reply_timeout
                )
            self._load()
            self._finish_reload()

    def _reset(self, epoch: bytes | None) -> None:
        """Redis came back without our data: evict everything, start the namespace
        again (slots and counters go on), refill."""
        self._evict_lost()
        self._loaded = False
        self._ensure_ready()

    def _evict_lost(self) -> None:
        """Redis no longer holds this replay: drop what the index held, counted
        (``resets``, ``lost_in_resets``). A reload still pending is moot: the reset
        counts everything the index held, its lost writes included."""
        log.warning(
            "REPLAY LOST: %s came back without this replay's data (a new volume, a "
            "restart without its AOF, or a FLUSH); dropping the %d transitions the index "
            "held and refilling from the actors",
            self._where,
            self.size,
        )
        self._pending_reload = None  # its load never happened: the counters are as they were
        self.index.evict_all()
        self._chunks = set()

    def _reload(self, epoch: bytes | None, redis_next: int) -> None:
        """Redis holds other data than the index describes: rebuild from Redis."""
        ours = self.index.next
        if epoch == self._epoch and redis_next < ours:
            reason = f"Redis lost its newest writes (next slot {redis_next}, index {ours})"
            try:  # keep the newest priorities for what survived
                self.snapshot()
            except ReplayUnavailable:
                pass
        else:
            reason = "the namespace was rewritten by someone else"
        log.warning("replay shard: %s; reloading the index from Redis", reason)
        lost_writes = epoch == self._epoch and redis_next < ours
        # What the reload must finish once a load succeeds: an outage inside it
        # (Redis still LOADING its AOF) leaves it pending, redone by the next
        # `_ensure_ready`, never half done; a Redis found empty meanwhile makes it
        # a reset instead (`_load_checked`).
        self._pending_reload = (dict(self.counters), ours, ours - redis_next if lost_writes else 0)
        self._loaded = False
        self._ensure_ready()

    def _finish_reload(self) -> None:
        """After a successful load: the counters go on from before the reload, and
        after lost writes the lost slots stay unused (`_skip_to`) and are counted."""
        if self._pending_reload is None:
            return
        keep, ours, lost = self._pending_reload
        if lost and self.index.next < ours:
            try:
                self._skip_to(ours)
            except ReplayUnavailable:
                self._loaded = False  # load again, then skip again
                raise
        for name in ("inserted_total", "resets", "lost_in_resets", "outages", "outage_ms"):
            self.counters[name] = max(self.counters[name], keep[name])
        if lost:
            self.counters["lost"] = max(self.counters["lost"], keep["lost"]) + lost
        self._pending_reload = None

    def _skip_to(self, nxt: int) -> None:
        """Slots stay monotonic after lost writes: the lost slots stay unused
        (`ReplayIndex.plan_skip`), in Redis as in memory."""
        skipped = nxt - self.index.next
        plan = self.index.plan_skip(nxt)
        if not plan.pushes:
            return
        pipe = self._client.pipeline(transaction=True)
        new_chunks = self._queue_writes(pipe, plan)
        pipe.hset(self.keys.meta, mapping=self.index.meta(plan))
        with replay_errors(self._where):
            pipe.execute()
        self.index.apply(plan)
        self._chunks |= new_chunks
        log.warning(
            "replay shard: the %d slots lost with Redis's newest writes stay unused (next slot %d)",
            skipped,
            nxt,
        )

    def _load(self) -> None:
        """Rebuild the in-memory index from what this Redis holds (if anything).

        Bounded and defensive: sizes are checked before anything is allocated,
        records that fail validation get weight 0, group records that do not
        parse are dropped. Raises `NamespaceError` for another run's replay or a
        key of the wrong type.
        """
        try:
            self._load_checked()
        except redis.ResponseError as exc:  # WRONGTYPE and friends: not an outage
            raise NamespaceError(
                f"the {self._where} holds replay keys that are not a replay: {exc}"
            ) from None

    def _load_checked(self) -> None:
        k, client = self.keys, self._client
        token = os.urandom(16).hex()
        with replay_errors(self._where):
            pipe = client.pipeline(transaction=False)
            pipe.set(k.epoch, token, nx=True)
            pipe.get(k.epoch)
            pipe.hgetall(k.meta)
            pipe.hgetall(k.identity)
            pipe.get(k.dictionary)
            _, epoch, meta_raw, ident_raw, dictionary = pipe.execute()
        if dictionary is not None:
            self._dict = dictionary
        if self.identity is not None and ident_raw:
            stored = ReplayIdentity.from_redis(ident_raw)
            diff = self.identity.differences(stored)
            if diff:
                raise NamespaceError(
                    f"the replay at {self._where} was made with other settings: {'; '.join(diff)}"
                )
        elif self.identity is not None and meta_raw:
            with replay_errors(self._where):
                client.hset(k.identity, mapping=self.identity.to_redis())
        meta = _parse_meta(meta_raw, self._where)
        if "capacity" not in meta:
            if self.size > 0:  # the index held a replay this Redis no longer has
                self._evict_lost()
            self._init_namespace(epoch)
            return
        if meta["capacity"] != self.capacity:
            raise NamespaceError(
                f"the {self._where} holds a replay of capacity {meta['capacity']}, not "
                f"{self.capacity}: pass --capacity so that capacity/shards = {meta['capacity']}, "
                "or --replay-reset"
            )
        first, nxt = meta.get("first_slot", 0), meta.get("next_slot", 0)
        if not 0 <= first <= nxt <= first + self.capacity:
            raise NamespaceError(f"the {self._where} has inconsistent slots ({first}, {nxt})")
        rec = np.zeros(self.capacity, RECORD_DTYPE)
        chunks: set[int] = set()
        n_chunks = -(-self.capacity // RECORDS_PER_CHUNK)
        for c in range(n_chunks):
            want = chunk_len(self.capacity, c)
            with replay_errors(self._where):
                length = client.strlen(k.records(c))
                raw = client.get(k.records(c)) if length == want * RECORD_DTYPE.itemsize else None
            if raw is None:
                if length:
                    log.warning("replay shard: record chunk %d has %d bytes; ignored", c, length)
                continue
            chunks.add(c)
            rec[c * RECORDS_PER_CHUNK : c * RECORDS_PER_CHUNK + want] = np.frombuffer(
                raw, RECORD_DTYPE
            )
        with replay_errors(self._where):
            snap = client.get(k.priorities)
            group_raw = client.hgetall(k.groups)
        if len(group_raw) > self.capacity + 4096:
            raise NamespaceError(f"the {self._where} holds {len(group_raw)} frame groups")
        report = self.index.load(rec, first, nxt, meta, snap, group_raw)
        self._chunks = chunks
        self._epoch = epoch
        self._loaded = True
        if report.bad_groups or report.bad_records:
            log.warning(
                "replay shard: ignored %d bad frame groups and %d bad records while loading",
                report.bad_groups,
                report.bad_records,
            )
        log.info(
            "replay shard at %s loaded %d transitions, %d frames",
            redact(self.url),
            self.size,
            self.index.groups.frame_count,
        )

    def _init_namespace(self, epoch: bytes) -> None:
        """An empty namespace: write its metadata (and identity, dictionary)."""
        k = self.keys
        meta = {"capacity": self.capacity, **self.index.meta()}
        with replay_errors(self._where):
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(k.meta, mapping=meta)
            if self.identity is not None:
                pipe.hset(k.identity, mapping=self.identity.to_redis())
            if self._dict is not None:
                pipe.set(k.dictionary, self._dict, nx=True)
            pipe.execute()
        self._epoch = epoch
        self._loaded = True


def _parse_meta(raw: dict[bytes, bytes], where: str) -> dict[str, int]:
    meta, problems = parse_meta(raw)
    if problems:
        raise NamespaceError(f"the {where}: {'; '.join(problems)}")
    return meta
