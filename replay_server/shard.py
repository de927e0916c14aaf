"""One replay shard: the single owner of a Redis-backed prioritized FIFO ring.

Call order::

    shard = ReplayShard(url, capacity)       # loads what the Redis holds (or later)
    shard.start()                            # background ingest, snapshots, GC
    shard.sample(512) -> ShardSample         # any thread (Ray max_concurrency>1)
    shard.update_priorities(keys, prios)
    shard.stop()                             # final snapshot

Storage (key names in :mod:`replay_server.keys`):

* frames: one key per frame, written once by a :class:`ReplayWriter`;
* transitions: monotonic integer *slots*; slot ``s`` lives at position
  ``s % capacity`` of a FIFO ring. The shard writes each transition as an
  80-byte record (:data:`RECORD_DTYPE`) into chunk strings of 4,096 records
  (one Redis key per chunk, not per transition: ~0.02 B of key overhead per
  transition instead of ~70), preallocated at full size so SETRANGE never grows
  (and over-allocates) them;
* frame lifetime: :class:`FrameGroups` (a frame is deleted once eviction has
  passed every slot that refers to it);
* priorities: in memory (sum tree of ``priority**alpha``), snapshotted into
  Redis every ``snapshot_seconds`` and at :meth:`stop`.

Ingest is reliable: a round reads up to 64 pushes with LRANGE (without removing
them), plans the new index on copies, and writes records, frame groups, frees,
counters *and the LTRIM that removes those pushes* in one MULTI/EXEC. Only when
Redis has accepted it does the in-memory index change. A round that fails (Redis
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
reload (`_load`) is bounded and defensive: bad records get weight 0 (never
sampled), bad group records are dropped (their frames become orphans).

Orphan frames (stored by a writer but referenced by no live transition: left by
a lost ingest window, a malformed push or a reset) are deleted by a sweep at
start and every ``gc_seconds`` (``orphans_collected``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import redis

from common.types import COUNTER_BITS, PRIORITY_FLOOR, STACK
from common.wire import WireError, decode_batch
from replay_server.frame_groups import FrameGroups
from replay_server.keys import ReplayKeys
from replay_server.namespace import NamespaceError, ReplayIdentity, parse_meta
from replay_server.protocol import ReplayUnavailable, ShardSample, ShardStats, replay_errors
from replay_server.redis_proc import connect, redact
from replay_server.sum_tree import SumTree

log = logging.getLogger(__name__)

RECORD_DTYPE = np.dtype(
    [
        ("ids", "<i8", (2 * STACK,)),
        ("action", "<i4"),
        ("ret", "<f4"),
        ("disc", "<f4"),
        ("prio", "<f4"),
    ]
)  # ids = s (4 frame ids, oldest first) then s' (4); prio = initial priority
RECORDS_PER_CHUNK = 4096
MIN_PRIORITY = PRIORITY_FLOOR  # the same floor as the actors' initial priorities
MAX_PRIORITY = 1e6  # |TD| of clipped-reward DQN stays below ~200; 1e6 is generous
MAX_RETURN = 1e9  # n-step returns of raw scores stay far below this
MAX_ACTIONS = 1 << 16
SLOT_BITS = 56  # keys are slots < 2**56; the sampler puts the shard index above
BACKOFF_MAX_S = 2.0
HEARTBEAT_S = 1.0
OUTAGE_LOG_EVERY_S = 30.0

# counters kept in ``P meta`` (besides capacity, first_slot, next_slot, next_gid)
_COUNTERS = (
    "received",
    "inserted_total",
    "evictions",
    "malformed",
    "rejected",
    "dangling",
    "lost",
    "resets",
    "lost_in_resets",
    "orphans_collected",
    "outages",
    "outage_ms",
)


@dataclass
class _Plan:
    """One ingest round, computed on copies; applied once Redis accepted it."""

    pipe: redis.client.Pipeline
    groups: FrameGroups
    first: int
    next: int
    rows: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (pos, records)
    chunks: set[int] = field(default_factory=set)
    counts: dict[str, int] = field(default_factory=dict)


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
    ) -> None:
        if capacity < 1 or capacity >= 1 << 40:
            raise ValueError(f"capacity={capacity} must be in [1, 2**40)")
        self.url = url
        self._where = f"Redis at {redact(url)}"
        self.capacity = int(capacity)
        self.alpha = float(alpha)
        self.codec = codec
        self.identity = identity
        self.num_actions = identity.num_actions if identity else MAX_ACTIONS
        self.snapshot_seconds = float(snapshot_seconds)
        self.gc_seconds = float(gc_seconds)
        self.keys = ReplayKeys(namespace)
        self.pid = os.getpid()
        self.started_at = time.time()
        self._client: redis.Redis | None = None
        self._epoch: bytes | None = None
        self._dict: bytes | None = None  # zstd-dict dictionary, restored after a reset
        self._loaded = False
        self._lock = threading.Lock()  # in-memory index
        self._ingest_lock = threading.RLock()  # one ingest/load/sweep at a time
        self._rng = np.random.default_rng(seed)
        self._rec = np.zeros(self.capacity, RECORD_DTYPE)
        self._prio = np.zeros(self.capacity, np.float32)
        self._tree = SumTree(self.capacity)
        self._groups = FrameGroups()
        self._chunks: set[int] = set()
        self._first = 0  # oldest live slot
        self._next = 0  # next slot to assign
        self.counters = dict.fromkeys(_COUNTERS, 0)
        self.sampled_total = 0
        self.ingest_errors = 0
        self.removed = 0
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
        return self._next - self._first

    @property
    def inserted_total(self) -> int:
        return self.counters["inserted_total"]

    def ingest(self, max_batches: int = 64) -> int:
        """Move up to max_batches pushes from the incoming list into the replay.

        Returns the number of transitions stored. Raises `ReplayUnavailable`
        (nothing changed anywhere: the same pushes are read again next time).
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
            if epoch != self._epoch or int(next_slot or 0) != self._next:
                self._reload(epoch, int(next_slot or 0))
                return 0
            if not raw:
                return 0
            plan = self._plan(raw, int(incarnation or 0))
            with replay_errors(self._where):
                plan.pipe.execute()
            self._apply(plan)
            self._rate.append((time.monotonic(), self.inserted_total))
            return plan.counts.get("inserted_total", 0)

    def sample(self, batch_size: int) -> ShardSample:
        """batch_size transitions drawn with probability p_i**alpha / total.

        Empty arrays (b = 0) when the shard is empty or not loaded yet.
        Importance weights are the sampler's job (they need every shard's totals).
        """
        with self._lock:
            total, size = self._tree.total, self.size
            if size == 0 or total <= 0 or batch_size <= 0:
                pos = np.zeros(0, np.int64)
                probs = np.zeros(0, np.float64)
            else:
                pos = self._tree.sample(batch_size, self._rng)
                probs = self._tree.get(pos) / total
            rec = self._rec[pos]
            slots = self._first + (pos - self._first) % self.capacity
            self.sampled_total += int(pos.size)
            inserted = self.inserted_total
        ids = rec["ids"]
        return ShardSample(
            keys=slots.astype(np.int64),
            probs=probs,
            obs_ids=np.ascontiguousarray(ids[:, :STACK]),
            next_obs_ids=np.ascontiguousarray(ids[:, STACK:]),
            actions=rec["action"].astype(np.int64),
            returns=rec["ret"].astype(np.float32),
            discounts=rec["disc"].astype(np.float32),
            size=int(size),
            total=float(total),
            inserted=int(inserted),
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of sampled keys (int64[k] slots), clipped to
        [MIN_PRIORITY, MAX_PRIORITY]; keys of evicted slots and non-finite
        priorities are ignored. Returns how many were applied."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        p = np.asarray(priorities, np.float64)
        if slots.shape != p.shape:
            raise ValueError(f"keys {slots.shape} and priorities {p.shape} differ in shape")
        with self._lock:
            ok = (slots >= self._first) & (slots < self._next) & np.isfinite(p)
            pos = slots[ok] % self.capacity
            pr = np.clip(p[ok], MIN_PRIORITY, MAX_PRIORITY)
            self._prio[pos] = pr
            self._tree.update(pos, pr**self.alpha)
            return int(ok.sum())

    def remove(self, keys: np.ndarray) -> int:
        """Never sample these slots again (weight 0): rows whose frames are gone
        (counted ``removed``). Returns how many live slots were removed."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        with self._lock:
            ok = (slots >= self._first) & (slots < self._next)
            pos = np.unique(slots[ok] % self.capacity)
            self._tree.update(pos, np.zeros(pos.size))
            self.removed += int(pos.size)
            return int(pos.size)

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
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        with self._lock:
            ok = (slots >= self._first) & (slots < self._next)
            out = np.full(slots.shape, np.nan, np.float32)
            out[ok] = self._prio[slots[ok] % self.capacity]
        return out

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
        c = self.counters
        with self._lock:
            return ShardStats(
                size=self.size,
                capacity=self.capacity,
                inserted_total=c["inserted_total"],
                inserts_per_s=rate,
                sampled_total=self.sampled_total,
                total_priority=self._tree.total,
                bytes_used=self._mem[1],
                evictions=c["evictions"],
                received=c["received"],
                malformed=c["malformed"],
                rejected=c["rejected"],
                dangling=c["dangling"],
                removed=self.removed,
                ingest_errors=self.ingest_errors,
                frames_stored=self._groups.frame_count,
                frame_groups=len(self._groups),
                lost=c["lost"],
                resets=c["resets"],
                lost_in_resets=c["lost_in_resets"],
                orphans_collected=c["orphans_collected"],
                outages=c["outages"],
                outage_s=c["outage_ms"] / 1000.0 + (now - down if down is not None else 0.0),
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

    def snapshot(self) -> None:
        """Write the priorities of all live slots into Redis (``keys.priorities``)."""
        with self._ingest_lock:
            self._ensure_ready()
            with self._lock:
                first, nxt = self._first, self._next
                pos = np.arange(first, nxt, dtype=np.int64) % self.capacity
                body = self._prio[pos].astype("<f4").tobytes()
            head = np.array([first, nxt], "<i8").tobytes()
            with replay_errors(self._where):
                self._client.set(self.keys.priorities, head + body)
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
            with self._lock:
                orphan = ~self._groups.covered(found)
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
    def _plan(self, raw: list[bytes], incarnation: int) -> _Plan:
        """Compute one ingest round on copies; nothing in memory changes here."""
        cap = self.capacity
        plan = _Plan(
            pipe=self._client.pipeline(transaction=True),
            groups=self._groups.copy(),
            first=self._first,
            next=self._next,
        )
        counts = plan.counts
        for item in raw:
            try:
                meta, batch = decode_batch(item)
            except WireError as exc:
                counts["malformed"] = counts.get("malformed", 0) + 1
                log.warning("skipping malformed replay entry (%d bytes): %s", len(item), exc)
                continue
            fids = meta["frame_ids"]
            counts["received"] = counts.get("received", 0) + len(batch)
            if not _writer_frames_ok(fids, incarnation):
                counts["rejected"] = counts.get("rejected", 0) + len(batch)
                log.warning(
                    "rejecting a push whose %d new frame ids are not one writer's run", len(fids)
                )
                continue
            nxt0 = plan.next
            added = plan.groups.add(fids, nxt0 + len(batch) - 1)
            ids = np.concatenate([batch.obs_ids, batch.next_obs_ids], axis=1)
            rows = plan.groups.lookup(ids.ravel()).reshape(ids.shape)
            known = (rows >= 0).all(axis=1)
            valid = _records_ok(batch, self.num_actions)
            counts["dangling"] = counts.get("dangling", 0) + int((~known & valid).sum())
            counts["rejected"] = counts.get("rejected", 0) + int((~valid).sum())
            good = known & valid
            k = int(good.sum())
            if k > cap:  # a push bigger than the replay: only its newest fit
                good[np.flatnonzero(good)[: k - cap]] = False
                counts["evictions"] = counts.get("evictions", 0) + k - cap
                k = cap
            slots = nxt0 + np.arange(k, dtype=np.int64)
            plan.groups.touch(rows[good].ravel(), np.repeat(slots, 2 * STACK))
            pos = slots % cap
            rec = np.zeros(k, RECORD_DTYPE)
            rec["ids"] = ids[good]
            rec["action"] = batch.actions[good]
            rec["ret"] = batch.returns[good]
            rec["disc"] = batch.discounts[good]
            rec["prio"] = batch.priorities[good]
            plan.rows.append((pos, rec))
            plan.next = nxt0 + k
            evict = max(0, plan.next - plan.first - cap)
            plan.first += evict
            counts["evictions"] = counts.get("evictions", 0) + evict
            counts["inserted_total"] = counts.get("inserted_total", 0) + k
            freed_gids, freed = plan.groups.release(plan.first)
            self._queue_writes(plan, pos, rec, added, freed_gids, freed)
        meta = {
            "next_slot": plan.next,
            "first_slot": plan.first,
            "next_gid": plan.groups.next_gid,
            **{n: self.counters[n] + counts.get(n, 0) for n in _COUNTERS},
        }
        plan.pipe.hset(self.keys.meta, mapping=meta)
        plan.pipe.ltrim(self.keys.incoming, len(raw), -1)
        return plan

    def _queue_writes(self, plan: _Plan, pos, rec, added, freed_gids, freed) -> None:
        """Queue one push's records, groups and frees into the round's MULTI."""
        pipe, k = plan.pipe, self.keys
        if pos.size:
            chunk = pos // RECORDS_PER_CHUNK
            brk = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(pos) != 1)) + 1
            for run in np.split(np.arange(pos.size), brk):
                c, p0 = int(chunk[run[0]]), int(pos[run[0]])
                if c not in self._chunks and c not in plan.chunks:
                    n = min(RECORDS_PER_CHUNK, self.capacity - c * RECORDS_PER_CHUNK)
                    pipe.set(k.records(c), bytes(n * RECORD_DTYPE.itemsize), nx=True)
                    plan.chunks.add(c)
                off = (p0 - c * RECORDS_PER_CHUNK) * RECORD_DTYPE.itemsize
                pipe.setrange(k.records(c), off, rec[run].tobytes())
        if added is not None:
            gid, gids, gone = added
            pipe.hset(k.groups, str(gid), FrameGroups.pack(gids, int(plan.next) - 1))
            if gone:
                pipe.hdel(k.groups, *[str(g) for g in gone])
        if freed_gids:
            pipe.hdel(k.groups, *[str(g) for g in freed_gids])
            fk = k.frames(freed)
            for i in range(0, len(fk), 4096):
                pipe.unlink(*fk[i : i + 4096])

    def _apply(self, plan: _Plan) -> None:
        """Make the accepted round the in-memory index."""
        with self._lock:
            for pos, rec in plan.rows:
                self._rec[pos] = rec
                pr = np.clip(rec["prio"].astype(np.float64), MIN_PRIORITY, MAX_PRIORITY)
                self._prio[pos] = pr
                self._tree.update(pos, pr**self.alpha)
            self._groups = plan.groups
            self._first, self._next = plan.first, plan.next
            self._chunks |= plan.chunks
            for name, n in plan.counts.items():
                self.counters[name] += n

    # ---- background ---------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
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
                self._note_down(exc)
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
        """Liveness key (and a write: an idle shard notices a Redis refusing writes)."""
        with replay_errors(self._where):
            self._client.set(self.keys.heartbeat, f"{self.pid} {time.time():.3f}", ex=10)
        self._last_beat = time.monotonic()

    def _note_down(self, exc: BaseException) -> None:
        self.ingest_errors += 1
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
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

    # ---- load, reload, reset ---------------------------------------------------
    def _ensure_ready(self) -> None:
        if self._loaded:
            return
        with self._ingest_lock:
            if self._loaded:
                return
            if self._client is None:
                self._client = connect(self.url)
            self._load()

    def _reset(self, epoch: bytes | None) -> None:
        """Redis came back without our data: evict everything, start the namespace
        again (slots and counters go on), refill."""
        lost = self.size
        log.warning(
            "REPLAY LOST: %s came back without this replay's data (a new volume, a "
            "restart without its AOF, or a FLUSH); dropping the %d transitions the index "
            "held and refilling from the actors",
            self._where,
            lost,
        )
        with self._lock:
            self._first = self._next
            self._tree.set_all(np.zeros(self.capacity))
            self._groups = FrameGroups()
            self._chunks = set()
            self.counters["resets"] += 1
            self.counters["lost_in_resets"] += lost
        self._loaded = False
        self._ensure_ready()

    def _reload(self, epoch: bytes | None, redis_next: int) -> None:
        """Redis holds other data than the index describes: rebuild from Redis."""
        ours = self._next
        if epoch == self._epoch and redis_next < ours:
            reason = f"Redis lost its newest writes (next slot {redis_next}, index {ours})"
            try:  # keep the newest priorities for what survived
                self.snapshot()
            except ReplayUnavailable:
                pass
        else:
            reason = "the namespace was rewritten by someone else"
        log.warning("replay shard: %s; reloading the index from Redis", reason)
        keep = dict(self.counters)
        self._loaded = False
        self._ensure_ready()
        for name in ("inserted_total", "resets", "lost_in_resets", "outages", "outage_ms"):
            self.counters[name] = max(self.counters[name], keep[name])
        if epoch == self._epoch and redis_next < ours:
            self.counters["lost"] = max(self.counters["lost"], keep["lost"]) + ours - redis_next

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
            want = min(RECORDS_PER_CHUNK, self.capacity - c * RECORDS_PER_CHUNK)
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
        live = np.arange(first, nxt, dtype=np.int64)
        pos = live % self.capacity
        prio = rec["prio"][pos].astype(np.float64)
        with replay_errors(self._where):
            snap = client.get(k.priorities)
            group_raw = client.hgetall(k.groups)
        if snap is not None and len(snap) >= 16 and (len(snap) - 16) % 4 == 0:
            s0, s1 = (int(x) for x in np.frombuffer(snap[:16], "<i8"))
            sp = np.frombuffer(snap[16:], "<f4")
            if sp.size == s1 - s0 and 0 <= s0 <= s1:
                m = (live >= s0) & (live < s1)
                prio[m] = sp[live[m] - s0]
        groups = FrameGroups()
        bad_groups = 0
        if len(group_raw) > self.capacity + 4096:
            raise NamespaceError(f"the {self._where} holds {len(group_raw)} frame groups")
        for gid_raw, data in group_raw.items():
            try:
                gid = int(gid_raw)
                ids, created = FrameGroups.unpack(data)
                if not 0 <= gid < 1 << 62 or (groups.lookup(ids) >= 0).any():
                    raise ValueError("bad or overlapping group")
                groups.add(ids, created, gid=gid)
            except ValueError:
                bad_groups += 1
        recs = rec[pos]
        valid = _stored_ok(recs, self.num_actions) & np.isfinite(prio) & (prio >= 0)
        prio = np.where(valid, np.clip(prio, MIN_PRIORITY, MAX_PRIORITY), MIN_PRIORITY)
        rows = groups.lookup(recs["ids"].ravel()).reshape(recs["ids"].shape)
        known = (rows >= 0).all(axis=1)
        weight = np.zeros(self.capacity, np.float64)
        weight[pos] = np.where(valid & known, prio**self.alpha, 0.0)
        ok = rows >= 0
        groups.touch(rows[ok], np.repeat(live, 2 * STACK).reshape(rows.shape)[ok])
        with self._lock:
            self._rec = rec
            self._prio[:] = 0
            self._prio[pos] = prio
            self._tree.set_all(weight)
            self._groups = groups
            self._chunks = chunks
            self._first, self._next = first, nxt
            for name in _COUNTERS:
                self.counters[name] = meta.get(name, 0)
            self.counters["rejected"] += int((~valid).sum())
            self.counters["dangling"] += int((valid & ~known).sum())
        self._groups.next_gid = max(self._groups.next_gid, meta.get("next_gid", 0))
        self._epoch = epoch
        self._loaded = True
        if bad_groups or (~valid).any():
            log.warning(
                "replay shard: ignored %d bad frame groups and %d bad records while loading",
                bad_groups,
                int((~valid).sum()),
            )
        log.info(
            "replay shard at %s loaded %d transitions, %d frames",
            redact(self.url),
            self.size,
            self._groups.frame_count,
        )

    def _init_namespace(self, epoch: bytes) -> None:
        """An empty namespace: write its metadata (and identity, dictionary)."""
        k = self.keys
        meta = {
            "capacity": self.capacity,
            "first_slot": self._first,
            "next_slot": self._next,
            "next_gid": self._groups.next_gid,
            **self.counters,
        }
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


def _writer_frames_ok(fids: np.ndarray, incarnation: int) -> bool:
    """A push's new frames: one contiguous run of ids of one registered writer."""
    if fids.size == 0:
        return True
    inc = fids >> COUNTER_BITS
    if inc[0] < 1 or inc[0] > incarnation or (inc != inc[0]).any():
        return False
    return bool(np.all(np.diff(fids) == 1))


def _valid(actions, returns, discounts, priorities, num_actions: int) -> np.ndarray:
    """bool[n]: which transitions have sane fields (pushed or read back from Redis)."""
    with np.errstate(invalid="ignore"):
        return (
            (actions >= 0)
            & (actions < num_actions)
            & np.isfinite(returns)
            & (np.abs(returns) <= MAX_RETURN)
            & (discounts >= 0)
            & (discounts <= 1)
            & np.isfinite(priorities)
            & (priorities >= 0)
            & (priorities <= MAX_PRIORITY)
        )


def _records_ok(batch, num_actions: int) -> np.ndarray:
    """bool[n]: which pushed transitions have sane fields."""
    return _valid(batch.actions, batch.returns, batch.discounts, batch.priorities, num_actions)


def _stored_ok(recs: np.ndarray, num_actions: int) -> np.ndarray:
    """bool[n]: which records read back from Redis have sane fields."""
    return _valid(recs["action"], recs["ret"], recs["disc"], recs["prio"], num_actions)
