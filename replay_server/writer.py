"""The actor-side replay client: push new frames and transitions in one round trip.

Call order (one writer per actor process start)::

    w = ReplayWriter(url, codec="lz4")   # PING + INCR -> w.incarnation
    ids = make_frame_id(w.incarnation, counters)
    w.push(new_frame_ids, new_frames, batch, actor=i, policy_version=v)  # repeat

``push`` raises :class:`ReplayUnavailable` when Redis is unreachable; the caller
buffers and retries the same push later (a retried push is idempotent for frames,
and the shard tolerates a repeated batch).
"""

from __future__ import annotations

import threading

import numpy as np
import redis

from common.types import FRAME_SHAPE, TransitionBatch
from common.wire import FrameCodec, WireError, encode_batch, train_zstd_dictionary
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import ReplayUnavailable, connect, redact

DICT_MIN_FRAMES = 256  # zstd-dict: frames needed before training the dictionary


def load_dictionary(client: redis.Redis, keys: ReplayKeys) -> bytes | None:
    """The replay's zstd dictionary, or None when none was trained yet."""
    return client.get(keys.dictionary)


class ReplayWriter:
    """Pushes one actor's frames (each once) and TransitionBatches to one shard.

    url:   the shard's Redis. codec: lz4 | zstd | zstd-dict | none.
    For ``zstd-dict`` the dictionary lives in Redis (``ReplayKeys.dictionary``):
    the first writer holding >= 256 frames trains it and SETNX's it; until then
    frames go out as plain ``zstd`` (the frame header says which, so readers
    decode both). Thread-safe (one push at a time).
    """

    def __init__(self, url: str, codec: str = "lz4", namespace: str = "apex") -> None:
        self.url = url
        self.keys = ReplayKeys(namespace)
        self.client = connect(url)
        self.codec_name = codec
        FrameCodec("none" if codec == "zstd-dict" else codec)  # validates the name
        self._codec: FrameCodec | None = None
        self._pending: list[np.ndarray] = []  # zstd-dict: frames to train on
        self._lock = threading.Lock()
        try:
            self.incarnation = int(self.client.incr(self.keys.incarnation))
            self.client.setnx(self.keys.codec, codec)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: BaseException) -> ReplayUnavailable:
        return ReplayUnavailable(
            f"cannot reach Redis at {redact(self.url)}: {exc}; the actor keeps the batch "
            "and retries (start redis-server or omit --redis-url to use the embedded one)"
        )

    def _frame_codec(self, frames: np.ndarray) -> FrameCodec:
        if self._codec is not None:
            return self._codec
        if self.codec_name != "zstd-dict":
            self._codec = FrameCodec(self.codec_name)
            return self._codec
        d = load_dictionary(self.client, self.keys)
        if d is None:
            self._pending.append(frames)
            have = sum(len(f) for f in self._pending)
            if have >= DICT_MIN_FRAMES:
                sample = np.concatenate(self._pending)[-4096:]
                try:
                    self.client.setnx(self.keys.dictionary, train_zstd_dictionary(sample))
                except WireError:
                    pass  # too uniform; keep collecting
                d = load_dictionary(self.client, self.keys)
        if d is None:
            return FrameCodec("zstd")
        self._pending.clear()
        self._codec = FrameCodec("zstd-dict", d)
        return self._codec

    def push(
        self,
        frame_ids: np.ndarray,
        frames: np.ndarray,
        batch: TransitionBatch,
        actor: int,
        policy_version: int,
    ) -> tuple[int, int | None]:
        """Store the new frames and queue the batch: ONE pipelined round trip.

        frame_ids: int64[m] ids of frames not pushed before; frames: uint8[m, 84, 84].
        batch: transitions referring to these and earlier pushed frames (by id).
        Returns ``(pushed, budget)``: transitions pushed to this shard by all
        writers so far, and the learner's insert budget (None = unlimited); a
        writer with ``pushed > budget`` should wait (see `allowance`).
        """
        frame_ids = np.asarray(frame_ids)
        if frame_ids.dtype != np.int64 or frame_ids.ndim != 1:
            raise ValueError(
                f"frame_ids: expected int64[m], got {frame_ids.dtype}{list(frame_ids.shape)}"
            )
        if frames.dtype != np.uint8 or frames.shape != (len(frame_ids), *FRAME_SHAPE):
            raise ValueError(
                f"frames: expected uint8[{len(frame_ids)}, 84, 84], got {frames.dtype}{list(frames.shape)}"
            )
        payload = encode_batch(batch, actor, policy_version, frame_ids)
        with self._lock:
            try:
                codec = self._frame_codec(frames) if len(frames) else None
                pipe = self.client.pipeline(transaction=False)
                if codec is not None:
                    blobs = codec.encode(frames)
                    pipe.mset(dict(zip(self.keys.frames(frame_ids), blobs, strict=True)))
                pipe.rpush(self.keys.incoming, payload)
                pipe.incrby(self.keys.pushed, len(batch))
                pipe.get(self.keys.budget)
                *_, pushed, budget = pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise self._unavailable(exc) from None
        return int(pushed), None if budget is None else int(budget)

    def allowance(self) -> tuple[int, int | None]:
        """``(pushed, budget)`` as `push` returns them, without pushing (one round trip)."""
        with self._lock:
            try:
                pushed, budget = self.client.mget([self.keys.pushed, self.keys.budget])
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                raise self._unavailable(exc) from None
        return int(pushed or 0), None if budget is None else int(budget)

    def close(self) -> None:
        self.client.close()
