"""ReplayOutbox against a real redis-server, without ALE: made-up frames and transitions."""

from __future__ import annotations

import threading
import time

import numpy as np
import redis

from actors.outbox import THROTTLE_MAX_S, ReplayOutbox
from common.types import TransitionBatch
from common.wire import FrameCodec, decode_batch
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import EmbeddedRedis

KEYS = ReplayKeys()


class Producer:
    """An actor-shaped source: 2 envs, one frame each per step, a transition per
    env per step whose s and s' are the last 4 / the 4 after (local counters)."""

    def __init__(self) -> None:
        self.counter = 0
        self.rng = np.random.default_rng(0)

    def step(self, box: ReplayOutbox, steps: int) -> None:
        for _ in range(steps):
            ids = np.arange(self.counter, self.counter + 2, dtype=np.int64)
            self.counter += 2
            frames = self.rng.integers(0, 255, (2, 84, 84), dtype=np.uint8)
            box.add_frames(ids, frames)
            if ids[0] >= 8:
                obs = np.stack([ids - 2 * k for k in (4, 3, 2, 1)], axis=1)
                nxt = np.stack([ids - 2 * k for k in (3, 2, 1, 0)], axis=1)
                box.add(
                    TransitionBatch(
                        obs_ids=obs,
                        next_obs_ids=nxt,
                        actions=np.zeros(2, np.int64),
                        returns=np.zeros(2, np.float32),
                        discounts=np.full(2, 0.97, np.float32),
                        priorities=np.ones(2, np.float32),
                    )
                )

    def refs(self) -> list[np.ndarray]:
        """What the actor's stacks still hold: the last 4 steps' frames."""
        return [np.arange(max(0, self.counter - 8), self.counter, dtype=np.int64)]


def stored(url: str) -> tuple[list[TransitionBatch], set[int]]:
    client = redis.Redis.from_url(url)
    batches = [decode_batch(p)[1] for p in client.lrange(KEYS.incoming, 0, -1)]
    ids = {KEYS.frame_id(k) for k in client.scan_iter(match=KEYS.frame_pattern(), count=1000)}
    client.close()
    return batches, ids


def test_outage_buffers_bounded_then_everything_kept_resolves(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", limit=50, actor_index=0, refs=prod.refs)
    try:
        prod.step(box, 10)
        assert box.flush(0) is not None and box.stats().pushed == 2 * (10 - 4)
        srv.kill()  # kill -9: nothing flushed, connections reset
        prod.step(box, 100)  # 200 transitions, only 50 may stay
        for _ in range(3):
            assert box.flush(0, force=True) is None
        st = box.stats()
        assert st.buffered == 50 and st.dropped == 150 and not st.replay_ok
        assert st.push_failed >= 3
        # Frames no transition or stack can need are gone too (bounded memory).
        held = sum(len(c) for c, _ in box._frames)
        assert held <= 50 + 8 + 2
        srv = EmbeddedRedis(str(tmp_path / "r"), port=srv.port, password=srv.password)  # its AOF
        assert box.flush(0, force=True) is not None
        st = box.stats()
        assert st.replay_ok and st.buffered == 0 and st.pushed == 12 + 50
        batches, ids = stored(srv.url)
        every = TransitionBatch.concat(batches)
        assert len(every) == st.pushed
        refs = np.concatenate([every.obs_ids.ravel(), every.next_obs_ids.ravel()])
        assert set(refs.tolist()) <= ids  # every kept transition's frames were kept
        frames = FrameCodec("lz4").decode(redis.Redis.from_url(srv.url).mget(KEYS.frames(refs[:8])))
        assert frames.shape == (8, 84, 84)
    finally:
        box.close()
        srv.stop()


def test_reset_registers_again_and_retries_at_once(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", limit=1000, actor_index=0, refs=prod.refs)
    try:
        prod.step(box, 10)
        box.flush(0)
        old = box.incarnation
        client = redis.Redis.from_url(srv.admin_url)
        epoch = client.get(KEYS.epoch)
        client.flushall()
        prod.step(box, 5)
        assert box.flush(0) is None  # refused: the epoch changed; registered again
        assert box.stats().resets == 1 and client.get(KEYS.epoch) != epoch
        assert box.flush(0) is not None  # retried at once, no backoff
        assert box.incarnation is not None and box.stats().pushed == 12 + 10
        # Everything now in Redis carries the new epoch's ids.
        batches, ids = stored(srv.url)
        assert len(batches) == 1 and all(i >> 40 == box.incarnation for i in ids)
        assert old is not None
    finally:
        box.close()
        srv.stop()


def test_throttle_waits_for_the_budget_and_is_bounded(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", limit=1000, actor_index=0, refs=prod.refs)
    client = redis.Redis.from_url(srv.url)
    stop = threading.Event()
    try:
        prod.step(box, 10)
        client.set(KEYS.budget, 0)
        allowance = box.flush(0)
        assert allowance == (12, 0)
        calls = []

        def on_wait() -> None:  # the learner catches up after two polls
            calls.append(1)
            if len(calls) == 2:
                client.set(KEYS.budget, 100)

        t0 = time.monotonic()
        box.throttle(allowance, stop, on_wait)
        assert len(calls) == 2 and time.monotonic() - t0 < THROTTLE_MAX_S
        # A learner that never catches up holds an actor at most THROTTLE_MAX_S.
        client.set(KEYS.budget, 0)
        t0 = time.monotonic()
        box.throttle((12, 0), stop)
        assert THROTTLE_MAX_S <= time.monotonic() - t0 < THROTTLE_MAX_S + 2
        # and stop() ends a wait at once
        threading.Timer(0.2, stop.set).start()
        t0 = time.monotonic()
        box.throttle((12, 0), stop)
        assert time.monotonic() - t0 < 1.5
    finally:
        box.close()
        srv.stop()
