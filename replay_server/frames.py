"""Fetch a batch's frames from the shards' Redis and decode them in place.

The hot path of the learner's data: for the rows one shard contributed to a
batch, ``FrameFetcher.fetch`` asks for the rows' distinct frame ids in one round
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
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import redis

from common.types import STACK
from common.wire import CODEC_IDS, FrameCodec, WireError
from replay_server.keys import ReplayKeys
from replay_server.protocol import replay_errors
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
    """What `FrameFetcher.fetch` did for one shard's rows.

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
        """
        n = ids.shape[0]
        ok = np.zeros(n, bool)
        missing = corrupt = 0
        for k, row0, rows in spans:
            sel = np.arange(row0, row0 + rows)
            r = self.fetch(k, ids[sel], frames, stack_positions(sel, capacity))
            ok[sel] = r.ok
            missing += r.missing
            corrupt += r.corrupt
        return FetchResult(ok, missing, corrupt)

    def fetch(self, k: int, ids: np.ndarray, frames: np.ndarray, pos: np.ndarray) -> FetchResult:
        """Frames of shard k's rows into ``frames[pos]``.

        ids:     int64[b, 8]  frame ids of each row: s (oldest first) then s'
        frames:  uint8[P, 84, 84]  C-contiguous, writable (e.g. a shared slot)
        pos:     int64[b, 8]  where each of those frames goes (distinct positions)
        Rows not ``ok`` have unspecified frames. Raises `ReplayUnavailable`.
        """
        b = ids.shape[0]
        if b == 0:
            return FetchResult(np.zeros(0, bool))
        flat = ids.reshape(-1)
        uniq, first, inv = np.unique(flat, return_index=True, return_inverse=True)
        # Each distinct frame decodes into its first position; fetch them in the
        # order of those positions, so the decoder writes forward through memory
        # (~10% faster than in frame-id order).
        order = np.argsort(pos.reshape(-1)[first], kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        uniq, first, inv = uniq[order], first[order], rank[inv.reshape(-1)]
        dest = pos.reshape(-1)[first]
        good = np.ones(uniq.size, bool)
        missing = corrupt = 0
        # Decode each chunk as its reply arrives while Redis answers the next ones.
        with closing(self._mget_chunks(k, uniq)) as replies:
            for lo, blobs in replies:
                idx = np.arange(lo, lo + len(blobs))
                gone = blobs.count(None)
                if gone:
                    missing += gone
                    keep = np.array([x is not None for x in blobs])
                    good[idx[~keep]] = False
                    idx = idx[keep]
                    blobs = [x for x in blobs if x is not None]
                corrupt += self._decode(k, blobs, frames, dest[idx], good, idx)
        ok = good[inv].reshape(b, 2 * STACK).all(axis=1)
        # Copy each distinct frame to its other positions (rows that kept all frames).
        dup = np.ones(flat.size, bool)
        dup[first] = False
        dup &= np.repeat(ok, 2 * STACK)
        if dup.any():
            frames[pos.reshape(-1)[dup]] = frames[dest[inv[dup]]]
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

    def _mget_chunks(self, k: int, ids: np.ndarray) -> Iterator[tuple[int, list[bytes | None]]]:
        """(first index, values) per chunk of ``MGET_CHUNK`` ids (None where a key
        is missing): every chunk's MGET is sent at once (one round trip), and each
        reply is yielded as it arrives. Close the generator when done: a reply
        left unread closes the connection."""
        chunks = [(i, ids[i : i + MGET_CHUNK]) for i in range(0, ids.size, MGET_CHUNK)]
        where, done = self._where[k], 0
        conn = self._conns[k]
        try:
            with replay_errors(where):
                if conn is None:
                    conn = self._conns[k] = self._client(k).connection_pool.get_connection()
                cmd = b"".join(self.mget_command(c) for _, c in chunks)
                conn.send_packed_command([cmd], check_health=False)  # one sendall
            for lo, c in chunks:
                with replay_errors(where):
                    reply = conn.read_response()
                if not isinstance(reply, list) or len(reply) != c.size:
                    raise redis.ResponseError(
                        f"MGET of {c.size} keys answered {type(reply).__name__}"
                    )
                done += 1
                yield lo, reply
        finally:
            if done < len(chunks) and conn is not None:
                conn.disconnect()  # a half-read reply must not be read by the next call
