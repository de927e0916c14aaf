"""Learner side of the replay: prioritized minibatches over all shards.

Call order (one sampler per learner)::

    sampler = ReplaySampler(shards, urls, codec, min_size=..., samples_per_insert=...)
    loader = PrefetchLoader(lambda: sampler.sample(512, beta()), workers=2, queue_size=4)
    batch = loader.get(timeout=1.0)           # SampleBatch or None
    sampler.update_priorities(batch.keys, new_priorities)
    loader.close()

``shards[k]`` is anything with synchronous ``sample(batch_size) -> ShardSample``,
``update_priorities(keys, priorities)`` and ``stats() -> ShardStats`` (a
:class:`ReplayShard` in tests, an adapter over a Ray actor handle in production);
``urls[k]`` is the Redis of that shard, which the sampler reads frames from
directly (one MGET per shard per batch).

Why this differs from the paper: Ape-X samples one central replay; here a batch
is split across shards by a multinomial draw with probabilities proportional
to each shard's total priority, which gives every transition the same
probability ``p_i**alpha / sum_all`` a single replay would.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.types import FRAME_SHAPE, STACK, SampleBatch
from common.wire import FrameCodec, WireError
from replay_server.keys import ReplayKeys
from replay_server.protocol import ShardSample
from replay_server.rate_limiter import RateLimiter
from replay_server.redis_proc import connect
from replay_server.shard import SLOT_BITS

SLOT_MASK = (1 << SLOT_BITS) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed batch-sized buffers in glibc's heap instead of returning them.

    A batch of 512 allocates ~24 MB of decoded frames and 28 MB of stacks. With
    glibc's defaults these go to fresh mmap/brk pages each batch, and the page
    faults cost more than the copies (bench/replay.py: 49 -> 26 ms per batch on
    the 2-core dev machine). Raises the mmap threshold to 32 MB and the trim
    threshold to 1 GiB for this process. Linux/glibc only; returns False elsewhere.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)
    except (OSError, AttributeError):
        return False


class ReplaySampler:
    """Thread-safe: several loader workers may call :meth:`sample` at once.

    min_size: total stored transitions before the first batch.
    samples_per_insert / tolerance: see :class:`RateLimiter` (0 = unlimited).
    wait_timeout: seconds :meth:`sample` waits for the limiter before returning None.
    malloc_tuning: call :func:`tune_malloc` (process-wide; see there why).
    """

    def __init__(
        self,
        shards: Sequence[Any],
        urls: Sequence[str],
        codec: str = "lz4",
        min_size: int = 1,
        samples_per_insert: float = 0.0,
        tolerance: float | None = None,
        wait_timeout: float = 1.0,
        namespace: str = "apex",
        seed: int | None = None,
        malloc_tuning: bool = True,
    ) -> None:
        if len(shards) != len(urls) or not shards:
            raise ValueError(
                f"need one Redis URL per shard, got {len(shards)} shards, {len(urls)} urls"
            )
        if len(shards) >= 1 << (63 - SLOT_BITS):
            raise ValueError(f"at most {1 << (63 - SLOT_BITS)} shards")
        if malloc_tuning:
            tune_malloc()
        self.shards = list(shards)
        self.keys = ReplayKeys(namespace)
        self.clients = [connect(u) for u in urls]
        self.codec_name = codec
        self._codecs = [FrameCodec("lz4") for _ in shards]  # decodes any codec by header
        self.limiter = RateLimiter(min_size, samples_per_insert, tolerance)
        self.wait_timeout = float(wait_timeout)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        k = len(shards)
        self._totals = np.zeros(k)
        self._sizes = np.zeros(k, np.int64)
        self._inserted = np.zeros(k, np.int64)
        self._fresh = False
        self.sampled = 0
        self.dropped_rows = 0
        self.corrupt_batches = 0

    # ---- public API ---------------------------------------------------------
    def sample(self, batch_size: int, beta: float) -> SampleBatch | None:
        """A prioritized batch of up to batch_size transitions, or None when the
        replay is below min_size or the rate limiter held it back for
        ``wait_timeout`` s. Rows whose frames vanished (evicted between the index
        draw and the MGET) are dropped (``dropped_rows``)."""
        if not self.limiter.acquire(batch_size, self._counts, self.wait_timeout):
            return None
        batch = None
        try:
            batch = self._draw(batch_size, beta)
        finally:
            got = 0 if batch is None else len(batch)
            if got < batch_size:
                self.limiter.release(batch_size - got)
        if batch is not None:
            with self._lock:
                self.sampled += len(batch)
        return batch

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Route new priorities (float[B]) of sampled keys (int64[B]) to their shards."""
        keys = np.asarray(keys, np.int64)
        priorities = np.asarray(priorities, np.float32)
        shard = keys >> SLOT_BITS
        for k in np.unique(shard):
            m = shard == k
            self.shards[int(k)].update_priorities(keys[m] & SLOT_MASK, priorities[m])

    def stats(self) -> dict:
        return {
            "sampled": self.sampled,
            "dropped_rows": self.dropped_rows,
            "corrupt_batches": self.corrupt_batches,
            "limiter_wait_s": self.limiter.waited_s,
            "replay_size": int(self._sizes.sum()),
            "replay_inserted": int(self._inserted.sum()),
        }

    # ---- internals ----------------------------------------------------------
    def _counts(self, refresh: bool) -> tuple[int, int]:
        if refresh or not self._fresh:
            stats = [s.stats() for s in self.shards]
            with self._lock:
                for k, st in enumerate(stats):
                    self._totals[k] = st.total_priority
                    self._sizes[k] = st.size
                    self._inserted[k] = st.inserted_total
                self._fresh = True
        return int(self._inserted.sum()), int(self._sizes.sum())

    def _draw(self, batch_size: int, beta: float) -> SampleBatch | None:
        with self._lock:
            totals = self._totals.copy()
        if totals.sum() <= 0:
            self._counts(True)
            with self._lock:
                totals = self._totals.copy()
            if totals.sum() <= 0:
                return None
        share = totals / totals.sum()
        with self._lock:
            counts = self._rng.multinomial(batch_size, share)
        parts = []
        for k, c in enumerate(counts):
            if c:
                r = self.shards[k].sample(int(c))
                with self._lock:
                    self._totals[k], self._sizes[k] = r.total, r.size
                    self._inserted[k] = r.inserted
                if len(r):
                    parts.append((k, r))
        with self._lock:
            n_all = float(self._sizes.sum())
        obs = np.empty((batch_size, STACK, *FRAME_SHAPE), np.uint8)
        nxt = np.empty_like(obs)
        cols: dict[str, list[np.ndarray]] = {
            n: [] for n in ("keys", "p", "actions", "returns", "discounts")
        }
        row = 0
        for k, r in parts:
            ok = self._fetch(k, r, obs, nxt, row)
            b = int(ok.sum())
            row += b
            cols["keys"].append((np.int64(k) << SLOT_BITS) | r.keys[ok])
            cols["p"].append(share[k] * r.probs[ok])
            for name in ("actions", "returns", "discounts"):
                cols[name].append(getattr(r, name)[ok])
        if row == 0:
            return None
        p = np.concatenate(cols["p"])
        w = (n_all * p) ** (-float(beta))
        w /= w.max()
        return SampleBatch(
            obs=obs[:row],
            next_obs=nxt[:row],
            actions=np.concatenate(cols["actions"]).astype(np.int64),
            returns=np.concatenate(cols["returns"]).astype(np.float32),
            discounts=np.concatenate(cols["discounts"]).astype(np.float32),
            weights=w.astype(np.float32),
            keys=np.concatenate(cols["keys"]).astype(np.int64),
        )

    def _fetch(
        self, k: int, r: ShardSample, obs: np.ndarray, nxt: np.ndarray, row: int
    ) -> np.ndarray:
        """MGET + decode shard k's frames; write stacks into obs/nxt from ``row``.
        Returns the bool[b] mask of rows kept."""
        ids = np.concatenate([r.obs_ids, r.next_obs_ids], axis=1)  # int64[b, 8]
        uniq, inv = np.unique(ids, return_inverse=True)
        inv = inv.reshape(ids.shape)
        blobs = self.clients[k].mget(self.keys.frames(uniq))
        present = np.fromiter((b is not None for b in blobs), bool, len(blobs))
        ok = np.ones(len(ids), bool)
        if not present.all():
            ok = present[inv].all(axis=1)
            remap = np.cumsum(present) - 1
            inv = remap[inv[ok]]
            blobs = [b for b in blobs if b is not None]
            with self._lock:
                self.dropped_rows += int((~ok).sum())
        if not ok.any():
            return ok
        codec = self._codecs[k]
        if self.codec_name == "zstd-dict" and codec.dictionary is None:
            d = self.clients[k].get(self.keys.dictionary)
            if d is not None:
                codec.set_dictionary(d)
        try:
            frames = codec.decode(blobs)
        except WireError:
            with self._lock:
                self.corrupt_batches += 1
                self.dropped_rows += int(ok.sum())
            return np.zeros(len(ids), bool)
        b = len(inv)
        # mode="clip": with out=, mode="raise" buffers the whole result (3x slower)
        np.take(frames, inv[:, :STACK], axis=0, out=obs[row : row + b], mode="clip")
        # mode="clip": with out=, mode="raise" buffers the whole result (3x slower)
        np.take(frames, inv[:, STACK:], axis=0, out=nxt[row : row + b], mode="clip")
        return ok


class PrefetchLoader:
    """Worker threads run ``sample_fn`` and queue its batches (None results are
    skipped). ``get`` measures how long the consumer waited (``wait_s``).

    Threads suffice: MGET waits on the socket and lz4/zstd decompression and
    numpy's gather release the GIL (``bench/replay.py`` measures the scaling).
    A worker's exception is re-raised by :meth:`get`.
    """

    def __init__(self, sample_fn: Callable[[], Any], workers: int = 2, queue_size: int = 4) -> None:
        if workers < 1 or queue_size < 1:
            raise ValueError(f"workers={workers} and queue_size={queue_size} must be >= 1")
        self._fn = sample_fn
        self._q: queue.Queue = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.wait_s = 0.0
        self.batches = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"replay-loader-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._fn()
                if batch is None:
                    continue
                while not self._stop.is_set():
                    try:
                        self._q.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as exc:  # surfaced to the consumer by get()
            self._error = exc
            self._stop.set()

    def get(self, timeout: float | None = None) -> Any | None:
        """The next batch, or None after ``timeout`` s (None = wait forever)."""
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        try:
            while True:
                if self._error is not None:
                    raise RuntimeError(
                        f"replay loader worker failed: {self._error!r}"
                    ) from self._error
                wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if wait <= 0:
                    return None
                try:
                    batch = self._q.get(timeout=wait)
                    self.batches += 1
                    return batch
                except queue.Empty:
                    continue
        finally:
            self.wait_s += time.monotonic() - start

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10.0)
        while not self._q.empty():
            self._q.get_nowait()
