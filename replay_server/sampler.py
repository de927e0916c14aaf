"""Learner side of the replay: prioritized minibatches over all shards.

A batch is made in three steps, which `replay_server.loader` spreads over
processes and ``sample`` runs in one thread::

    draw = sampler.draw(512)                  # rate limiter + index draws (shard.sample)
    result = fetcher.fetch_batch(draw.spans(), draw.ids(), frames, 512)   # Redis -> frames
    drawn = sampler.finish(draw, result, obs, next_obs)                   # DrawnBatch
    batch = drawn.weighted(beta)              # importance weights -> SampleBatch

    batch = sampler.sample(512, beta)         # the same, in this thread
    sampler.update_priorities(batch.keys, new_priorities)

The sampler takes the run's shards as `replay_server.endpoints.ShardLink` s: each
shard (a `replay_server.protocol.Shard`: a :class:`ReplayShard` in this process,
a `RemoteShard` over a Ray actor) with the endpoint of its Redis, which frames
are read from directly (`replay_server.frames`: one round trip of MGETs per
shard per batch).

Why this differs from the paper: Ape-X samples one central replay; here a batch
is split across shards by a multinomial draw with probabilities proportional
to each shard's total priority, which gives every transition the same
probability ``p_i**alpha / sum_all`` a single replay would.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.types import FRAME_SHAPE, STACK, SampleBatch
from replay_server.endpoints import ShardLink
from replay_server.frames import FetchResult, FrameFetcher
from replay_server.protocol import ReplayUnavailable, Shard, ShardSample
from replay_server.rate_limiter import ReplayRatio, ReplayRatioKeeper
from replay_server.records import SLOT_BITS

SLOT_MASK = (1 << SLOT_BITS) - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep freed batch-sized buffers in glibc's heap instead of returning them.

    A batch of 512 is ~29 MB of stacks. With glibc's defaults these go to fresh
    mmap pages each batch, and the page faults cost more than the copies
    (bench/replay.py: 49 -> 26 ms per batch on the 2-core dev machine). Raises the
    mmap threshold to 32 MB and the trim threshold to 1 GiB for this process.
    Linux/glibc only; returns False elsewhere. (Loader processes write into
    reused shared slots and need none of this.)
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        return bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok)
    except (OSError, AttributeError):
        return False


@dataclass
class Draw:
    """Rows drawn with priority over all shards, before their frames are fetched.

    parts:     (shard index, `ShardSample`) per contributing shard, in row order
    share:     float64[K] each shard's share of the total priority at draw time
    n_all:     transitions stored over all shards (for the importance weights)
    reserved:  rows reserved from the rate limiter (given back by finish/cancel)
    """

    parts: list[tuple[int, ShardSample]]
    share: np.ndarray
    n_all: float
    reserved: int

    def __len__(self) -> int:
        return sum(len(r) for _, r in self.parts)

    def spans(self) -> list[tuple[int, int, int]]:
        """(shard, first row, rows) per part."""
        out, row = [], 0
        for k, r in self.parts:
            out.append((k, row, len(r)))
            row += len(r)
        return out

    def ids(self) -> np.ndarray:
        """int64[n, 8] frame ids of every row: s (oldest first) then s'."""
        if not self.parts:
            return np.zeros((0, 2 * STACK), np.int64)
        return np.concatenate(
            [np.concatenate([r.obs_ids, r.next_obs_ids], axis=1) for _, r in self.parts]
        ).astype(np.int64, copy=False)


@dataclass
class DrawnBatch:
    """A fetched batch waiting for its importance weights (they depend on beta,
    which the learner sets when it takes the batch).

    obs, next_obs:  uint8[B, 4, 84, 84]
    keys:           int64[B]   shard index << SLOT_BITS | slot
    probs:          float64[B] each row's probability over the whole replay
    actions:        int64[B];  returns, discounts: float32[B]
    n_all:          transitions stored over all shards at draw time
    """

    obs: np.ndarray
    next_obs: np.ndarray
    keys: np.ndarray
    probs: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    n_all: float

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def weighted(self, beta: float) -> SampleBatch:
        """The `SampleBatch` with weights ``(N * P(i)) ** -beta``, normalised to max 1."""
        w = (self.n_all * self.probs) ** (-float(beta))
        w /= w.max()
        return SampleBatch(
            obs=self.obs,
            next_obs=self.next_obs,
            actions=self.actions,
            returns=self.returns,
            discounts=self.discounts,
            weights=w.astype(np.float32),
            keys=self.keys,
        )


@dataclass
class SamplerStats:
    """What `ReplaySampler.stats` reports (this process's sampler).

    sampled:          rows delivered to the learner
    dropped_rows:     drawn rows dropped because a frame was missing or corrupt
    missing_frames / corrupt_frames: frames that were not there / did not decode
    limiter_wait_s:   seconds the rate limiter held draws back
    replay_size / replay_inserted: all shards' stored and ever-stored transitions,
                      as of the sampler's last look
    """

    sampled: int
    dropped_rows: int
    missing_frames: int
    corrupt_frames: int
    limiter_wait_s: float
    replay_size: int
    replay_inserted: int


class ReplaySampler:
    """Thread-safe: several threads may draw, finish and sample at once.

    min_size: total stored transitions before the first batch.
    samples_per_insert / tolerance: see :class:`RateLimiter` (0 = unlimited).
    ratio: the run's `ReplayRatioKeeper` (it then owns min_size, the ratio and the
           tolerance, and hears of every delivered batch); None = one of its own
           from the three arguments above, with no insert budget.
    wait_timeout: seconds :meth:`draw` waits for the limiter before returning None.
    malloc_tuning: call :func:`tune_malloc` (process-wide; see there why).
    """

    def __init__(
        self,
        links: Sequence[ShardLink],
        codec: str = "lz4",
        min_size: int = 1,
        samples_per_insert: float = 0.0,
        tolerance: float | None = None,
        wait_timeout: float = 1.0,
        seed: int | None = None,
        malloc_tuning: bool = True,
        ratio: ReplayRatioKeeper | None = None,
    ) -> None:
        if not links:
            raise ValueError("a sampler needs at least one shard")
        if len(links) >= 1 << (63 - SLOT_BITS):
            raise ValueError(f"at most {1 << (63 - SLOT_BITS)} shards")
        if [link.endpoint.index for link in links] != list(range(len(links))):
            raise ValueError("links must be shard 0, 1, ... in order (replay_server.endpoints)")
        spaces = {link.endpoint.namespace for link in links}
        if len(spaces) != 1:
            raise ValueError(f"shards in several namespaces: {sorted(spaces)}")
        if malloc_tuning:
            tune_malloc()
        self.links = list(links)
        self.shards: list[Shard] = [link.shard for link in links]
        self.urls = [link.endpoint.url for link in links]
        self.namespace = spaces.pop()
        self.codec_name = codec
        if ratio is None:
            ratio = ReplayRatioKeeper(ReplayRatio(samples_per_insert, min_size), tolerance)
        self.ratio = ratio
        self.limiter = ratio.limiter
        self.wait_timeout = float(wait_timeout)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._local = threading.local()  # one FrameFetcher per thread for `sample`
        k = len(links)
        self._totals = np.zeros(k)
        self._sizes = np.zeros(k, np.int64)
        self._inserted = np.zeros(k, np.int64)
        self._fresh = False
        self.sampled = 0
        self.dropped_rows = 0
        self.missing_frames = 0
        self.corrupt_frames = 0

    # ---- public API ---------------------------------------------------------
    def sample(self, batch_size: int, beta: float) -> SampleBatch | None:
        """A prioritized batch of up to batch_size transitions, fetched in this
        thread, or None when the replay is below min_size or the rate limiter held
        it back for ``wait_timeout`` s. Rows whose frames vanished (evicted between
        the draw and the MGET) are dropped (``dropped_rows``). Raises
        `ReplayUnavailable` while the replay cannot be reached."""
        draw = self.draw(batch_size)
        if draw is None:
            return None
        try:
            n = len(draw)
            frames = np.empty((2 * n * STACK, *FRAME_SHAPE), np.uint8)
            result = self.fetcher().fetch_batch(draw.spans(), draw.ids(), frames, n)
        except BaseException:
            self.cancel(draw)
            raise
        obs = frames[: n * STACK].reshape(n, STACK, *FRAME_SHAPE)
        nxt = frames[n * STACK :].reshape(n, STACK, *FRAME_SHAPE)
        drawn = self.finish(draw, result, obs, nxt)
        return None if drawn is None else drawn.weighted(beta)

    def fetcher(self) -> FrameFetcher:
        """This thread's `FrameFetcher` over the shards' Redis."""
        f = getattr(self._local, "fetcher", None)
        if f is None:
            f = self._local.fetcher = FrameFetcher(self.urls, self.namespace, self.codec_name)
        return f

    def draw(self, batch_size: int) -> Draw | None:
        """Reserve batch_size rows from the rate limiter (waiting up to
        ``wait_timeout``) and draw them from the shards; None when held back or
        nothing is stored. Raises `ReplayUnavailable` (reservation given back)."""
        if not self.limiter.acquire(batch_size, self._counts, self.wait_timeout):
            return None
        try:
            draw = self._draw(batch_size)
        except BaseException:
            self.limiter.release(batch_size)
            raise
        if draw is None or len(draw) == 0:
            self.limiter.release(batch_size)
            return None
        return draw

    def cancel(self, draw: Draw) -> None:
        """Give back a draw's reservation (its frames were never delivered)."""
        self.limiter.release(draw.reserved)

    def finish(
        self, draw: Draw, result: FetchResult, obs: np.ndarray, next_obs: np.ndarray
    ) -> DrawnBatch | None:
        """The rows of ``draw`` that kept their frames, as a `DrawnBatch` whose
        ``obs``/``next_obs`` are views of the given arrays (uint8[n, 4, 84, 84],
        compacted in place when rows were dropped); None when no row is left.
        Gives the rest of the reservation back and counts what was delivered."""
        ok = result.ok
        b = int(ok.sum())
        n = len(draw)
        if b < n and b:
            obs[:b] = obs[:n][ok]
            next_obs[:b] = next_obs[:n][ok]
        self.limiter.release(draw.reserved - b)
        self.ratio.delivered(b)
        with self._lock:
            self.sampled += b
            self.dropped_rows += n - b
            self.missing_frames += result.missing
            self.corrupt_frames += result.corrupt
        keys = np.concatenate([(np.int64(k) << SLOT_BITS) | r.keys for k, r in draw.parts])
        if b < n:
            self._remove(keys[~ok])
        if b == 0:
            return None
        probs = np.concatenate([draw.share[k] * r.probs for k, r in draw.parts])
        cols = {
            name: np.concatenate([getattr(r, name) for _, r in draw.parts])[ok]
            for name in ("actions", "returns", "discounts")
        }
        return DrawnBatch(
            obs=obs[:b],
            next_obs=next_obs[:b],
            keys=keys[ok].astype(np.int64),
            probs=probs[ok],
            actions=cols["actions"].astype(np.int64),
            returns=cols["returns"].astype(np.float32),
            discounts=cols["discounts"].astype(np.float32),
            n_all=draw.n_all,
        )

    def _remove(self, keys: np.ndarray) -> None:
        """Rows whose frames are missing or corrupt leave their shard's sum tree, so a
        high-priority row that can never be delivered cannot starve sampling (rows
        of slots evicted since the draw are ignored by the shard)."""
        shard = keys >> SLOT_BITS
        for k in np.unique(shard):
            try:
                self.shards[int(k)].remove(keys[shard == k] & SLOT_MASK)
            except ReplayUnavailable:
                pass  # drawn again later, dropped again, removed then

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        """Route new priorities (float[B]) of sampled keys (int64[B]) to their shards."""
        keys = np.asarray(keys, np.int64)
        priorities = np.asarray(priorities, np.float32)
        shard = keys >> SLOT_BITS
        for k in np.unique(shard):
            m = shard == k
            self.shards[int(k)].update_priorities(keys[m] & SLOT_MASK, priorities[m])

    def stats(self) -> SamplerStats:
        return SamplerStats(
            sampled=self.sampled,
            dropped_rows=self.dropped_rows,
            missing_frames=self.missing_frames,
            corrupt_frames=self.corrupt_frames,
            limiter_wait_s=self.limiter.waited_s,
            replay_size=int(self._sizes.sum()),
            replay_inserted=int(self._inserted.sum()),
        )

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

    def _draw(self, batch_size: int) -> Draw | None:
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
                    self._inserted[k] = r.inserted_total
                if len(r):
                    parts.append((k, r))
        with self._lock:
            n_all = float(self._sizes.sum())
        return Draw(parts, share, n_all, batch_size)
