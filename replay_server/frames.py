"""Fetch a batch's frames from the shards' Redis and decode them in place.

The hot path of the learner's data: for the rows one shard contributed to a
batch, ``FrameFetcher.fetch_batch`` (or ``begin`` then ``finish``, to overlap
batches) asks for the rows' distinct frame ids in one round
trip (MGETs of ``MGET_CHUNK`` keys, all sent at once, the command bytes packed by
numpy), decodes each chunk as its reply arrives (so Redis prepares the next
reply meanwhile), each frame once and straight into its first position in the
caller's frame array (``FrameCodec.decode_into``: no intermediate bytes, no
join, no gather), then copies it to the other positions that share it (s_t and
s_{t+n} share a frame; rows share frames). Measured in ``bench/replay.py``; the
README says why each step is shaped this way.

Positions: the caller owns ``frames: uint8[P, 84, 84]`` and says where each
row's 8 frames go (``pos: int64[b, 8]``: s then s'); `stack_positions` gives the
layout of a batch whose ``obs`` and ``next_obs`` blocks lie one after the other.

Not thread-safe (one Redis connection per shard): one fetcher per thread or
process. Redis errors that mean "unavailable" become `ReplayUnavailable`
(`replay_server.protocol.replay_errors`); the connection reconnects on the
next call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import redis

from common.types import STACK
from common.wire import CODEC_IDS, FrameCodec, WireError
from replay_server.keys import ReplayKeys
from replay_server.protocol import ReplayUnavailable, replay_errors
from replay_server.redis_proc import redact

MGET_CHUNK = 512  # keys per MGET; all chunks go in one round trip, see _mget_chunks


def stack_positions(rows: np.ndarray, capacity: int) -> np.ndarray:
    """int64[b, 8] positions of rows' frames in a ``uint8[2 * capacity * 4, 84, 84]``
    array whose first half is ``obs[capacity, 4]`` and second half ``next_obs``."""
    rows = np.asarray(rows, np.int64)[:, None]
    j = np.arange(STACK, dtype=np.int64)[None, :]
    return np.concatenate([rows * STACK + j, (capacity + rows) * STACK + j], axis=1)


@dataclass
class FetchResult:
    """What `FrameFetcher.fetch_batch` (or ``finish``) did for one shard's rows.

    ok:       bool[b]  rows whose 8 frames are all in place
    missing:  frames the Redis no longer held (evicted after the draw)
    corrupt:  frames that failed to decode (counted, their rows dropped)
    """

    ok: np.ndarray
    missing: int = 0
    corrupt: int = 0


class FrameFetcher:
    """Reads frames from each shard's Redis (``urls[k]``) into caller-owned arrays.

    Connections open lazily (a Redis that is down at construction is an outage
    at the first fetch, not an error). ``codec`` is the run's codec: only
    ``zstd-dict`` matters here (the dictionary is read from Redis on first use);
    frames of any codec decode by their header.
    """

    def __init__(
        self,
        urls: list[str],
        namespace: str = "apex",
        codec: str = "lz4",
        socket_timeout: float = 30.0,
    ) -> None:
        if codec not in CODEC_IDS:
            raise ValueError(f"unknown codec {codec!r}; choose one of {', '.join(CODEC_IDS)}")
        self.urls = list(urls)
        self.keys = ReplayKeys(namespace)
        self.codec_name = codec
        self._timeout = socket_timeout
        self._clients: list[redis.Redis | None] = [None] * len(urls)
        self._conns: list[redis.Connection | None] = [None] * len(urls)
        self._gen = [0] * len(urls)  # bumped when a connection is dropped
        self._codecs = [FrameCodec("lz4") for _ in urls]  # decodes any codec by header
        self._where = [f"Redis at {redact(u)}" for u in urls]
        p = self.keys.frame_prefix
        width = len(p) + 8
        self._head = np.frombuffer(b"$%d\r\n" % width + p, np.uint8)
        self._rec = len(self._head) + 8 + 2

    def close(self) -> None:
        for c in self._conns:
            if c is not None:
                c.disconnect()
        for cl in self._clients:
            if cl is not None:
                cl.close()

    # ---- fetch ---------------------------------------------------------------
    def fetch_batch(
        self,
        spans: list[tuple[int, int, int]],
        ids: np.ndarray,
        frames: np.ndarray,
        capacity: int,
    ) -> FetchResult:
        """All frames of a batch laid out as `stack_positions` (obs then next_obs).

        spans:   (shard, first row, rows) per shard part, covering ids' rows
        ids:     int64[n, 8] frame ids of every row
        frames:  uint8[2 * capacity * 4, 84, 84], capacity >= n
        Rows not ``ok`` have unspecified frames. Raises `ReplayUnavailable`.
        """
        return self.finish(self.begin(spans, ids, frames, capacity))

    def begin(
        self,
        spans: list[tuple[int, int, int]],
        ids: np.ndarray,
        frames: np.ndarray,
        capacity: int,
    ) -> PendingFetch:
        """`fetch_batch`'s first half: send the batch's MGETs and return at once.

        A loader process begins the next batch before it finishes this one, so
        Redis looks up one batch's frames while this process decodes another's.
        Finish fetches in the order they were begun. Raises `ReplayUnavailable`.
        """
        parts = []
        for k, row0, rows in spans:
            if rows == 0:
                continue
            sel = np.arange(row0, row0 + rows)
            plan = _Plan.make(k, ids[sel], stack_positions(sel, capacity))
            parts.append((sel, plan, self._send(k, plan.uniq)))
        return PendingFetch(parts, frames, ids.shape[0])

    def finish(self, pending: PendingFetch) -> FetchResult:
        """Read the replies of a begun fetch and decode them into its frames."""
        ok = np.zeros(pending.n, bool)
        missing = corrupt = 0
        for sel, plan, sent in pending.parts:
            r = self._complete(plan, sent, pending.frames)
            ok[sel] = r.ok
            missing += r.missing
            corrupt += r.corrupt
        return FetchResult(ok, missing, corrupt)

    def _complete(self, plan: _Plan, sent: _Sent, frames: np.ndarray) -> FetchResult:
        k, good = plan.k, np.ones(plan.uniq.size, bool)
        missing = corrupt = 0
        for lo, blobs in self._replies(k, sent):  # each chunk as its reply arrives
            idx = np.arange(lo, lo + len(blobs))
            gone = blobs.count(None)
            if gone:
                missing += gone
                keep = np.array([x is not None for x in blobs])
                good[idx[~keep]] = False
                idx = idx[keep]
                blobs = [x for x in blobs if x is not None]
            corrupt += self._decode(k, blobs, frames, plan.dest[idx], good, idx)
        ok = good[plan.inv].reshape(-1, 2 * STACK).all(axis=1)
        # Copy each distinct frame to its other positions (rows that kept all frames).
        dup = plan.dup & np.repeat(ok, 2 * STACK)
        if dup.any():
            frames[plan.pos[dup]] = frames[plan.dest[plan.inv[dup]]]
        return FetchResult(ok, missing, corrupt)

    def _decode(self, k, blobs, frames, dest, good, present) -> int:
        """Decode blobs into frames[dest]; a bad frame is found one by one and
        marked not good. Returns how many were bad."""
        codec = self._codecs[k]
        zdict = self.codec_name == "zstd-dict" or (blobs and blobs[0][1:2] == b"\x03")
        if blobs and codec.dictionary is None and zdict:
            self._load_dictionary(k)
        try:
            codec.decode_into(blobs, frames, dest)
            return 0
        except WireError:
            pass
        bad = 0
        for i, blob in enumerate(blobs):  # rare: find the bad ones
            try:
                codec.decode_into([blob], frames, dest[i : i + 1])
            except WireError:
                good[present[i]] = False
                bad += 1
        return bad

    def _load_dictionary(self, k: int) -> None:
        client = self._client(k)
        with replay_errors(self._where[k]):
            d = client.get(self.keys.dictionary)
        if d is not None:
            try:
                self._codecs[k].set_dictionary(d)
            except WireError:
                pass  # its frames then fail to decode and are counted as corrupt

    # ---- Redis -----------------------------------------------------------------
    def _client(self, k: int) -> redis.Redis:
        c = self._clients[k]
        if c is None:
            c = self._clients[k] = redis.Redis.from_url(
                self.urls[k], socket_connect_timeout=5.0, socket_timeout=self._timeout
            )
        return c

    def mget_command(self, ids: np.ndarray) -> bytes:
        """The RESP bytes of ``MGET`` over the frame keys of int64[m] ids (numpy
        packs fixed-width records: ~20x faster than redis-py's packer for 4K keys).
        The keys are exactly `ReplayKeys.frames`."""
        m = ids.size
        rec = np.empty((m, self._rec), np.uint8)
        h = self._head.size
        rec[:, :h] = self._head
        rec[:, h : h + 8] = np.ascontiguousarray(ids, ">i8").view(np.uint8).reshape(m, 8)
        rec[:, h + 8 :] = (13, 10)
        return b"*%d\r\n$4\r\nMGET\r\n" % (m + 1) + rec.tobytes()

    def _conn(self, k: int) -> redis.Connection:
        conn = self._conns[k]
        if conn is None:
            conn = self._conns[k] = self._client(k).connection_pool.get_connection()
        return conn

    def _reset(self, k: int) -> None:
        """Drop shard k's connection (replies of begun fetches with it are lost)."""
        if self._conns[k] is not None:
            self._conns[k].disconnect()
        self._gen[k] += 1

    def _send(self, k: int, ids: np.ndarray) -> _Sent:
        """Send MGETs of ``MGET_CHUNK`` keys each for int64[m] ids, in one sendall."""
        chunks = [(i, ids[i : i + MGET_CHUNK]) for i in range(0, ids.size, MGET_CHUNK)]
        try:
            with replay_errors(self._where[k]):
                cmd = b"".join(self.mget_command(c) for _, c in chunks)
                self._conn(k).send_packed_command([cmd], check_health=False)
        except BaseException:
            self._reset(k)
            raise
        return _Sent(chunks, self._gen[k])

    def _replies(self, k: int, sent: _Sent) -> Iterator[tuple[int, list[bytes | None]]]:
        """(first index, values) per chunk of a `_send` (None where a key is
        missing), read in order. Any failure drops the connection."""
        where = self._where[k]
        if sent.gen != self._gen[k]:
            raise ReplayUnavailable(f"{where}: the connection was reset before the reply")
        conn = self._conn(k)
        try:
            for lo, c in sent.chunks:
                with replay_errors(where):
                    reply = conn.read_response()
                if not isinstance(reply, list) or len(reply) != c.size:
                    raise redis.ResponseError(
                        f"MGET of {c.size} keys answered {type(reply).__name__}"
                    )
                yield lo, reply
        except BaseException:
            self._reset(k)  # half-read replies must not be read by the next fetch
            raise


@dataclass
class _Sent:
    """MGET chunks sent on a shard's connection (its ``gen`` at the time)."""

    chunks: list[tuple[int, np.ndarray]]
    gen: int


@dataclass
class _Plan:
    """Where one shard's rows' frames go.

    uniq:  int64[u] distinct frame ids, in the order of their first position
    dest:  int64[u] that first position (each distinct frame decodes there once)
    inv:   int64[b * 8] index into uniq of every row position
    pos:   int64[b * 8] every row position
    dup:   bool[b * 8]  positions that copy their frame from its first position
    """

    k: int
    uniq: np.ndarray
    dest: np.ndarray
    inv: np.ndarray
    pos: np.ndarray
    dup: np.ndarray

    @staticmethod
    def make(k: int, ids: np.ndarray, pos: np.ndarray) -> _Plan:
        flat, pos = ids.reshape(-1), pos.reshape(-1)
        uniq, first, inv = np.unique(flat, return_index=True, return_inverse=True)
        # Fetch in the order of the first positions, so the decoder writes forward
        # through memory (~10% faster than in frame-id order).
        order = np.argsort(pos[first], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        first = first[order]
        dup = np.ones(flat.size, bool)
        dup[first] = False
        return _Plan(k, uniq[order], pos[first], rank[inv.reshape(-1)], pos, dup)


@dataclass
class PendingFetch:
    """A begun `FrameFetcher.fetch_batch`: pass it to `FrameFetcher.finish`."""

    parts: list[tuple[np.ndarray, _Plan, _Sent]]
    frames: np.ndarray
    n: int
