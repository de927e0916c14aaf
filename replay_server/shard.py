"""One replay shard: the single owner of a Redis-backed prioritized FIFO ring.

Call order::

    shard = ReplayShard(url, capacity)       # reloads what the Redis holds
    shard.start()                            # background ingest + snapshots
    shard.sample(512, beta) -> dict          # any thread (Ray max_concurrency>1)
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

Each ingest writes its records, frame groups and counters in one MULTI/EXEC, so
the AOF holds them consistently.

Crash recovery (kill -9 of the shard and its redis-server, same data dir): a new
``ReplayShard`` on the reloaded Redis finds every transition whose ingest reached
the AOF (``appendfsync everysec``: all but the last ~1 s), with the priorities of
the last snapshot (at most ``snapshot_seconds`` old; transitions newer than the
snapshot get their initial actor priority back). Batches popped from the incoming
list but not yet written when the shard died are lost, and their frames stay in
Redis unreferenced (at most one ingest round, ``max_batches`` pushes, per crash).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np
import redis

from common.types import PRIORITY_FLOOR, STACK
from common.wire import WireError, decode_batch
from replay_server.frame_groups import FrameGroups
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import ReplayUnavailable, connect, redact
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
SLOT_BITS = 56  # keys are slots < 2**56; the sampler puts the shard index above


class ReplayShard:
    """Prioritized FIFO replay of ``capacity`` transitions in one Redis.

    Thread-safe: ingest, sample, update_priorities and stats may run
    concurrently. Return values are plain numpy arrays and dicts.
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
    ) -> None:
        if capacity < 1 or capacity >= 1 << 40:
            raise ValueError(f"capacity={capacity} must be in [1, 2**40)")
        self.url = url
        self.capacity = int(capacity)
        self.alpha = float(alpha)
        self.codec = codec
        self.snapshot_seconds = float(snapshot_seconds)
        self.keys = ReplayKeys(namespace)
        self.client = connect(url)
        self._lock = threading.Lock()  # in-memory index
        self._ingest_lock = threading.Lock()  # one ingest at a time, in order
        self._rng = np.random.default_rng(seed)
        self._rec = np.zeros(self.capacity, RECORD_DTYPE)
        self._prio = np.zeros(self.capacity, np.float32)
        self._tree = SumTree(self.capacity)
        self._groups = FrameGroups()
        self._first = 0  # oldest live slot
        self._next = 0  # next slot to assign
        self.inserted_total = 0
        self.sampled_total = 0
        self.evictions = 0
        self.malformed = 0
        self.dangling = 0
        self.ingest_errors = 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=64)
        self._mem = (0.0, 0)
        self._last_snapshot = time.monotonic()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._load()

    # ---- public API ---------------------------------------------------------
    @property
    def size(self) -> int:
        return self._next - self._first

    def ingest(self, max_batches: int = 64) -> int:
        """Move up to max_batches pushes from the incoming list into the replay.

        Returns the number of transitions stored. Malformed entries are counted
        (``malformed``) and skipped; transitions whose frames the replay does not
        hold are dropped and counted (``dangling``).
        """
        with self._ingest_lock:
            try:
                raw = self.client.lpop(self.keys.incoming, max_batches) or []
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise ReplayUnavailable(
                    f"cannot reach Redis at {redact(self.url)}: {exc}"
                ) from None
            stored = 0
            for item in raw:
                try:
                    meta, batch = decode_batch(item)
                except WireError as exc:
                    self.malformed += 1
                    log.warning("skipping malformed replay entry (%d bytes): %s", len(item), exc)
                    continue
                stored += self._ingest_one(meta["frame_ids"], batch)
            if raw:
                self._rate.append((time.monotonic(), self.inserted_total))
            return stored

    def sample(self, batch_size: int, beta: float = 0.4) -> dict:
        """batch_size transitions drawn with probability p_i**alpha / total.

        Returns ``keys`` int64[B] (the slots), ``probs`` float64[B] (p_i/total of
        this shard), ``obs_ids``/``next_obs_ids`` int64[B, 4], ``actions`` int64[B],
        ``returns``/``discounts`` float32[B], and ``size``, ``total``, ``inserted``.
        Empty arrays (B = 0) when the shard is empty. ``beta`` is unused here (the
        sampler computes importance weights across shards); kept for the protocol.
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
        return {
            "keys": slots.astype(np.int64),
            "probs": probs,
            "obs_ids": np.ascontiguousarray(ids[:, :STACK]),
            "next_obs_ids": np.ascontiguousarray(ids[:, STACK:]),
            "actions": rec["action"].astype(np.int64),
            "returns": rec["ret"].astype(np.float32),
            "discounts": rec["disc"].astype(np.float32),
            "size": size,
            "total": total,
            "inserted": inserted,
        }

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of sampled keys (int64[k] slots); keys of evicted slots
        and non-finite priorities are ignored. Returns how many were applied."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        p = np.asarray(priorities, np.float64)
        if slots.shape != p.shape:
            raise ValueError(f"keys {slots.shape} and priorities {p.shape} differ in shape")
        with self._lock:
            ok = (slots >= self._first) & (slots < self._next) & np.isfinite(p)
            pos = slots[ok] % self.capacity
            pr = np.maximum(p[ok], MIN_PRIORITY)
            self._prio[pos] = pr
            self._tree.update(pos, pr**self.alpha)
            return int(ok.sum())

    def get_priorities(self, keys: np.ndarray) -> np.ndarray:
        """float32[k] current priorities of keys (NaN for slots no longer stored)."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        with self._lock:
            ok = (slots >= self._first) & (slots < self._next)
            out = np.full(slots.shape, np.nan, np.float32)
            out[ok] = self._prio[slots[ok] % self.capacity]
        return out

    def stats(self) -> dict:
        """Counters as plain Python numbers (Redis used_memory cached for 1 s)."""
        now = time.monotonic()
        if now - self._mem[0] > 1.0:
            try:
                self._mem = (now, int(self.client.info("memory")["used_memory"]))
            except (redis.RedisError, OSError):
                pass
        rate = 0.0
        if len(self._rate) >= 2:
            (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
            rate = (n1 - n0) / max(t1 - t0, 1e-9)
        with self._lock:
            return {
                "size": self.size,
                "capacity": self.capacity,
                "inserted_total": self.inserted_total,
                "inserts_per_s": rate,
                "sampled_total": self.sampled_total,
                "total_priority": self._tree.total,
                "bytes_used": self._mem[1],
                "evictions": self.evictions,
                "malformed": self.malformed,
                "dangling": self.dangling,
                "ingest_errors": self.ingest_errors,
                "frames_stored": self._groups.frame_count,
                "frame_groups": len(self._groups),
            }

    def start(self) -> None:
        """Run ingest (and periodic snapshots) in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="replay-ingest", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the ingest thread and write a final priority snapshot."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self.snapshot()

    def snapshot(self) -> None:
        """Write the priorities of all live slots into Redis (``keys.priorities``)."""
        with self._lock:
            first, nxt = self._first, self._next
            pos = np.arange(first, nxt, dtype=np.int64) % self.capacity
            body = self._prio[pos].astype("<f4").tobytes()
        head = np.array([first, nxt], "<i8").tobytes()
        self.client.set(self.keys.priorities, head + body)
        self._last_snapshot = time.monotonic()

    # ---- ingest -------------------------------------------------------------
    def _ingest_one(self, new_frame_ids: np.ndarray, batch) -> int:
        ids = np.concatenate([batch.obs_ids, batch.next_obs_ids], axis=1)
        cap = self.capacity
        with self._lock:
            nxt0 = self._next
            added = self._groups.add(new_frame_ids, nxt0 + len(batch) - 1)
            rows = self._groups.lookup(ids.ravel()).reshape(ids.shape)
            known = (rows >= 0).all(axis=1)
            sane = (batch.priorities >= 0) & np.isfinite(batch.priorities)
            sane &= np.isfinite(batch.returns) & np.isfinite(batch.discounts)
            self.dangling += int((~known & sane).sum())
            self.malformed += int((~sane).sum())
            good = known & sane
            k = int(good.sum())
            if k > cap:  # a push bigger than the replay: only its newest fit
                good[np.flatnonzero(good)[: k - cap]] = False
                self.evictions += k - cap
                k = cap
            slots = nxt0 + np.arange(k, dtype=np.int64)
            self._groups.touch(rows[good].ravel(), np.repeat(slots, 2 * STACK))
            pos = slots % cap
            rec = np.zeros(k, RECORD_DTYPE)
            rec["ids"] = ids[good]
            rec["action"] = batch.actions[good]
            rec["ret"] = batch.returns[good]
            rec["disc"] = batch.discounts[good]
            rec["prio"] = batch.priorities[good]
            self._rec[pos] = rec
            pr = np.maximum(rec["prio"].astype(np.float64), MIN_PRIORITY)
            self._prio[pos] = pr
            self._tree.update(pos, pr**self.alpha)
            self._next = nxt0 + k
            evict = max(0, self._next - self._first - cap)
            self._first += evict
            self.evictions += evict
            self.inserted_total += k
            freed_gids, freed = self._groups.release(self._first)
            meta = {
                b"next_slot": self._next,
                b"first_slot": self._first,
                b"inserted_total": self.inserted_total,
                b"evictions": self.evictions,
                b"malformed": self.malformed,
                b"dangling": self.dangling,
                b"next_gid": self._groups.next_gid,
            }
        self._write(pos, rec, added, freed_gids, freed, meta)
        return k

    def _write(self, pos, rec, added, freed_gids, freed, meta) -> None:
        """Persist one ingest (records, groups, counters, frees) in one MULTI/EXEC."""
        pipe = self.client.pipeline(transaction=True)
        if pos.size:
            chunk = pos // RECORDS_PER_CHUNK
            brk = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(pos) != 1)) + 1
            for run in np.split(np.arange(pos.size), brk):
                c, p0 = int(chunk[run[0]]), int(pos[run[0]])
                self._ensure_chunk(pipe, c)
                off = (p0 - c * RECORDS_PER_CHUNK) * RECORD_DTYPE.itemsize
                pipe.setrange(self.keys.records(c), off, rec[run].tobytes())
        if added is not None:
            gid, gids, gone = added
            pipe.hset(self.keys.groups, str(gid), FrameGroups.pack(gids, meta[b"next_slot"] - 1))
            if gone:
                pipe.hdel(self.keys.groups, *[str(g) for g in gone])
        if freed_gids:
            pipe.hdel(self.keys.groups, *[str(g) for g in freed_gids])
            fk = self.keys.frames(freed)
            for i in range(0, len(fk), 4096):
                pipe.unlink(*fk[i : i + 4096])
        pipe.hset(self.keys.meta, mapping=meta)
        pipe.execute()

    def _ensure_chunk(self, pipe, c: int) -> None:
        """Allocate chunk c at its full size once (SETRANGE growth over-allocates)."""
        if c in self._chunks:
            return
        n = min(RECORDS_PER_CHUNK, self.capacity - c * RECORDS_PER_CHUNK)
        pipe.set(self.keys.records(c), bytes(n * RECORD_DTYPE.itemsize), nx=True)
        self._chunks.add(c)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.ingest()
                if time.monotonic() - self._last_snapshot >= self.snapshot_seconds:
                    self.snapshot()
            except (ReplayUnavailable, redis.RedisError, OSError) as exc:
                self.ingest_errors += 1
                log.warning("replay ingest failed (retrying in 1 s): %s", exc)
                self._stop.wait(1.0)
                continue
            if n == 0:
                self._stop.wait(0.005)

    # ---- reload -------------------------------------------------------------
    def _load(self) -> None:
        """Rebuild the in-memory index from what this Redis holds (if anything)."""
        self._chunks: set[int] = set()
        meta = {k.decode(): int(v) for k, v in self.client.hgetall(self.keys.meta).items()}
        if "capacity" not in meta:
            if meta:
                raise RuntimeError(
                    f"replay metadata at {redact(self.url)} has no capacity ({meta}); "
                    "it is corrupt: FLUSHALL that Redis or use an empty data dir"
                )
            self.client.hset(self.keys.meta, "capacity", self.capacity)
            return
        if meta["capacity"] != self.capacity:
            raise ValueError(
                f"the Redis at {redact(self.url)} holds a replay of capacity {meta['capacity']}, "
                f"not {self.capacity}: pass --capacity so that capacity/shards = "
                f"{meta['capacity']}, or use an empty data dir / FLUSHALL it"
            )
        self._first = meta.get("first_slot", 0)
        self._next = meta.get("next_slot", 0)
        for name in ("inserted_total", "evictions", "malformed", "dangling"):
            setattr(self, name, meta.get(name, 0))
        self._groups.next_gid = meta.get("next_gid", 0)
        n_chunks = -(-self.capacity // RECORDS_PER_CHUNK)
        for c in range(n_chunks):
            raw = self.client.get(self.keys.records(c))
            if raw is None:
                continue
            self._chunks.add(c)
            arr = np.frombuffer(raw, RECORD_DTYPE)
            self._rec[c * RECORDS_PER_CHUNK : c * RECORDS_PER_CHUNK + arr.size] = arr
        live = np.arange(self._first, self._next, dtype=np.int64)
        pos = live % self.capacity
        prio = self._rec["prio"][pos].astype(np.float32)
        snap = self.client.get(self.keys.priorities)
        if snap is not None and len(snap) >= 16:
            s0, s1 = (int(x) for x in np.frombuffer(snap[:16], "<i8"))
            sp = np.frombuffer(snap[16:], "<f4")
            if sp.size == s1 - s0:
                m = (live >= s0) & (live < s1)
                prio[m] = sp[live[m] - s0]
        prio = np.maximum(prio, MIN_PRIORITY)
        self._prio[pos] = prio
        w = np.zeros(self.capacity, np.float64)
        w[pos] = prio.astype(np.float64) ** self.alpha
        self._tree.set_all(w)
        for gid, data in self.client.hgetall(self.keys.groups).items():
            ids, created = FrameGroups.unpack(data)
            self._groups.add(ids, created, gid=int(gid))
        if pos.size:
            ids = self._rec["ids"][pos]
            rows = self._groups.lookup(ids.ravel())
            ok = rows >= 0
            self._groups.touch(rows[ok], np.repeat(live, 2 * STACK)[ok])
        log.info(
            "replay shard at %s reloaded %d transitions, %d frames",
            redact(self.url),
            self.size,
            self._groups.frame_count,
        )
