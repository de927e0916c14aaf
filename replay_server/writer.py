"""The actor-side replay client: push new frames and transitions in one round trip.

Call order (one writer per actor process start)::

    w = ReplayWriter(url, codec="lz4")   # PING + register -> w.incarnation, w.epoch
    ids = make_frame_id(w.incarnation, counters)
    w.push(new_frame_ids, new_frames, batch, actor=i, policy_version=v)  # repeat

Both steps are small Lua scripts, so each is atomic in Redis:

* register: ``SET epoch <new token> NX``, then ``GET epoch`` and ``INCR
  incarnation``. The writer remembers the epoch it registered under.
* push: if ``epoch`` is still the writer's and none of the new frame keys exists,
  ``MSET`` the new frames, ``RPUSH`` the batch, ``INCRBY pushed`` and read the
  insert budget; otherwise write nothing. All or nothing: a writer killed
  mid-push leaves no orphan frames; a writer registered with a Redis that has
  since lost its data (restarted empty) can never write into the new data with
  its old ids; and a frame is never overwritten. A writer whose registration
  Redis lost with its newest writes (an older AOF: the ``INCR incarnation`` rolled
  back) raises the counter past its incarnation with its next push, so the
  shard accepts its pushes and no later registration reuses its ids.

``push`` raises :class:`ReplayUnavailable` when Redis is unreachable or refuses
writes (``OOM``, ``MISCONF``, ``READONLY``): nothing was written, the caller keeps
the data and retries later. On an epoch change, or a frame key that is taken, it
registers again (a new incarnation, hence fresh frame ids) and raises
:class:`ReplayReset`, a `ReplayUnavailable`: the retry goes out under the new
ids, and transitions that refer to frames pushed before the reset are dropped
by the shard as dangling.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import redis

from common.types import FRAME_SHAPE, TransitionBatch
from common.wire import FrameCodec, WireError, encode_batch, train_zstd_dictionary
from replay_server.keys import ReplayKeys
from replay_server.protocol import ReplayUnavailable, replay_errors
from replay_server.redis_proc import connect, redact

DICT_MIN_FRAMES = 256  # zstd-dict: frames needed before training the dictionary
MSET_ARGS = 1000  # key/value arguments per MSET inside the push script (even)

# KEYS: epoch, incarnation, codec. ARGV: a fresh epoch token, the codec name.
_REGISTER = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('SETNX', KEYS[3], ARGV[2])
return {redis.call('GET', KEYS[1]), redis.call('INCR', KEYS[2])}
"""

# KEYS: epoch, incoming, pushed, budget, incarnation, applied. ARGV: epoch, batch
# payload, n, the writer's incarnation, the push's id, the writer's token (random,
# per registration), then frame key, frame bytes, ... Returns {pushed, budget};
# {-3, pushed, budget}: this writer stored this push before (a retry whose first
# reply was lost): nothing is stored twice; {-1, current epoch}: the data was lost,
# register again; {-2, frames that exist} or {-2, -1} (the incarnation is another
# writer's): the incarnation was handed out twice (Redis lost its newest writes):
# nothing is overwritten, register again. A writer whose incarnation is above the
# counter registered in writes that Redis lost (an older AOF): the counter is
# raised past it, so no later registration reuses it. ``applied`` holds
# "token:last push id" per incarnation; a writer's push ids increase, and a failed
# push is retried before any later one.
_PUSH = f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {{-1, redis.call('GET', KEYS[1])}}
end
local cur = redis.call('HGET', KEYS[6], ARGV[4])
if cur then
  local sep = string.find(cur, ':', 1, true)
  if string.sub(cur, 1, sep - 1) ~= ARGV[6] then return {{-2, -1}} end
  if tonumber(ARGV[5]) <= tonumber(string.sub(cur, sep + 1)) then
    return {{-3, tonumber(redis.call('GET', KEYS[3]) or '0'), redis.call('GET', KEYS[4])}}
  end
end
local n = #ARGV
for i = 7, n, {MSET_ARGS} do
  local keys = {{}}
  for j = i, math.min(i + {MSET_ARGS - 1}, n), 2 do keys[#keys + 1] = ARGV[j] end
  local taken = redis.call('EXISTS', unpack(keys))
  if taken > 0 then return {{-2, taken}} end
end
if tonumber(redis.call('GET', KEYS[5]) or '0') < tonumber(ARGV[4]) then
  redis.call('SET', KEYS[5], ARGV[4])
end
for i = 7, n, {MSET_ARGS} do
  redis.call('MSET', unpack(ARGV, i, math.min(i + {MSET_ARGS - 1}, n)))
end
redis.call('RPUSH', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[6], ARGV[4], ARGV[6] .. ':' .. ARGV[5])
return {{redis.call('INCRBY', KEYS[3], ARGV[3]), redis.call('GET', KEYS[4])}}
"""


class ReplayReset(ReplayUnavailable):
    """The replay's Redis lost its data since this writer registered; the writer has
    registered again (new incarnation) and the push should be retried."""


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

    def __init__(
        self,
        url: str,
        codec: str = "lz4",
        namespace: str = "apex",
        reply_timeout: float = 30.0,
    ) -> None:
        self.url = url
        self._where = f"Redis at {redact(url)}"
        self.keys = ReplayKeys(namespace)
        self.codec_name = codec
        FrameCodec("none" if codec == "zstd-dict" else codec)  # validates the name
        self._codec: FrameCodec | None = None
        self._pending: list[np.ndarray] = []  # zstd-dict: frames to train on
        self._lock = threading.Lock()
        self.client = connect(url, reply_timeout=reply_timeout)
        self._register_script = self.client.register_script(_REGISTER)
        self._push_script = self.client.register_script(_PUSH)
        self.resets = 0  # registrations after the first (data lost, or ids taken)
        self.collisions = 0  # pushes refused because a frame key was taken
        self.duplicates = 0  # retried pushes found stored already (their reply was lost)
        self._next_push_id = 0
        self._register()

    def _register(self) -> None:
        """Take a new incarnation under the namespace's current epoch."""
        k = self.keys
        with replay_errors(self._where):
            epoch, incarnation = self._register_script(
                keys=[k.epoch, k.incarnation, k.codec], args=[os.urandom(16).hex(), self.codec_name]
            )
        self.epoch: bytes = epoch
        self.incarnation = int(incarnation)
        self.token = os.urandom(8).hex()  # tells this writer's pushes from another's
        self._codec = None  # a zstd dictionary may have changed with the data

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
        push_id: int | None = None,
        blobs: list[bytes] | None = None,
    ) -> tuple[int, int | None]:
        """Store the new frames and queue the batch: ONE round trip, all or nothing.

        frame_ids: int64[m] ids of frames not pushed before; frames: uint8[m, 84, 84].
        batch: transitions referring to these and earlier pushed frames (by id).
        push_id: the push's id; a retry of a push whose outcome is unknown (its
        reply was lost) passes the same id and is stored at most once. Ids must
        increase from push to push (None: the next one). blobs: the frames already
        encoded (`common.wire.FrameCodec.encode` of this writer's codec); ``frames``
        is then not used.
        Returns ``(pushed, budget)``: transitions pushed to this shard by all
        writers so far, and the learner's insert budget (None = unlimited); a
        writer with ``pushed > budget`` should wait (see `allowance`).
        """
        frame_ids = np.asarray(frame_ids)
        if frame_ids.dtype != np.int64 or frame_ids.ndim != 1:
            raise ValueError(
                f"frame_ids: expected int64[m], got {frame_ids.dtype}{list(frame_ids.shape)}"
            )
        if blobs is not None:
            if len(blobs) != len(frame_ids):
                raise ValueError(f"blobs: expected {len(frame_ids)}, got {len(blobs)}")
        elif frames.dtype != np.uint8 or frames.shape != (len(frame_ids), *FRAME_SHAPE):
            raise ValueError(
                f"frames: expected uint8[{len(frame_ids)}, 84, 84], got {frames.dtype}{list(frames.shape)}"
            )
        payload = encode_batch(batch, actor, policy_version, frame_ids)
        k = self.keys
        with self._lock, replay_errors(self._where):
            if push_id is None:
                push_id = self._next_push_id
            self._next_push_id = max(self._next_push_id, int(push_id) + 1)
            args: list[bytes | int | str] = [
                self.epoch, payload, len(batch), self.incarnation, int(push_id), self.token
            ]  # fmt: skip
            if len(frame_ids):
                if blobs is None:
                    blobs = self._frame_codec(frames).encode(frames)
                for key, blob in zip(k.frames(frame_ids), blobs, strict=True):
                    args += (key, blob)
            reply = self._push_script(
                keys=[k.epoch, k.incoming, k.pushed, k.budget, k.incarnation, k.applied],
                args=args,
            )
            pushed, budget = reply[0], reply[1] if len(reply) > 1 else None
            if int(pushed) == -3:
                self.duplicates += 1
                budget = reply[2] if len(reply) > 2 else None
                return int(reply[1]), None if budget is None else int(budget)
            if int(pushed) == -2:
                old_inc = self.incarnation
                self.resets += 1
                self.collisions += 1
                self._register()
                what = (
                    f"pushes of another writer under incarnation {old_inc}"
                    if int(budget) < 0
                    else f"{int(budget)} of this push's frame ids"
                )
                raise ReplayReset(
                    f"{self._where} already holds {what} (incarnation {old_inc} was handed "
                    "out twice after Redis lost its newest writes); nothing was overwritten; "
                    f"registered again as incarnation {self.incarnation}"
                )
            if int(pushed) < 0:
                old = self.epoch
                self.resets += 1
                self._register()
                raise ReplayReset(
                    f"{self._where} lost the replay's data (epoch {old[:8]!r}... is now "
                    f"{self.epoch[:8]!r}...); registered again as incarnation {self.incarnation}"
                )
        return int(pushed), None if budget is None else int(budget)

    def allowance(self) -> tuple[int, int | None]:
        """``(pushed, budget)`` as `push` returns them, without pushing (one round trip)."""
        with self._lock, replay_errors(self._where):
            pushed, budget = self.client.mget([self.keys.pushed, self.keys.budget])
        return int(pushed or 0), None if budget is None else int(budget)

    def close(self) -> None:
        self.client.close()
