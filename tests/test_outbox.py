"""ReplayOutbox against a real redis-server, without ALE: made-up frames and
transitions. Network faults go through `bench.netproxy.Proxy`, a real TCP proxy
on loopback; a hung server is a real SIGSTOP."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import redis

from actors.outbox import THROTTLE_MAX_S, ReplayOutbox
from bench.netproxy import Proxy
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


def wait_for(cond, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_outage_buffers_bounded_in_bytes_then_everything_kept_resolves(tmp_path):
    """Redis killed: sealed pushes (compressed) stay, bounded in bytes, the oldest
    dropped and counted; frames that kept transitions refer to are kept too; once
    Redis is back, every kept transition is stored with all its frames."""
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", limit_bytes=60_000, actor_index=0, refs=prod.refs)
    try:
        prod.step(box, 10)
        box.seal(0)
        assert box.drain(10) and box.stats().pushed == 2 * (10 - 4)
        srv.kill()  # kill -9: nothing flushed, connections reset
        for _ in range(20):  # 20 pushes of 10 steps: 400 transitions, ~240 KB of random frames
            prod.step(box, 10)
            box.seal(0)
        wait_for(lambda: not box.stats().replay_ok, what="the outage to be noticed")
        st = box.stats()
        # random frames hardly compress (~7 KB each): a push of 10 steps is ~150 KB,
        # so only the newest push (and the one in flight) stay
        assert st.buffered_bytes <= 60_000 + 2 * 160_000
        assert st.dropped > 0 and st.buffered + st.dropped == 400
        assert st.push_failed >= 1
        srv = EmbeddedRedis(str(tmp_path / "r"), port=srv.port, password=srv.password)  # its AOF
        assert box.drain(20)  # retried at once, not after the backoff
        st = box.stats()
        assert st.replay_ok and st.pushed == 12 + 400 - st.dropped and st.buffered_bytes == 0
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
    box = ReplayOutbox(srv.url, "lz4", limit_bytes=1 << 24, actor_index=0, refs=prod.refs)
    try:
        prod.step(box, 10)
        box.seal(0)
        assert box.drain(10)
        old = box.incarnation
        client = redis.Redis.from_url(srv.admin_url)
        epoch = client.get(KEYS.epoch)
        client.flushall()
        prod.step(box, 5)
        box.seal(0)  # refused: the epoch changed; registered again, retried at once
        assert box.drain(10)
        st = box.stats()
        assert st.resets == 1 and client.get(KEYS.epoch) != epoch
        assert box.incarnation is not None and st.pushed == 12 + 10
        # Everything now in Redis carries the new epoch's ids.
        batches, ids = stored(srv.url)
        assert len(batches) == 1 and all(i >> 40 == box.incarnation for i in ids)
        assert old is not None  # (the counter started again with the data: 1 again)
    finally:
        box.close()
        srv.stop()


def test_a_push_whose_reply_was_lost_is_stored_once(tmp_path):
    """The proxy lets the push reach Redis and throws its reply away: the outbox
    times out, retries the same push, and Redis recognises it (stored once)."""
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    with Proxy(srv.host, srv.port) as proxy:
        box = ReplayOutbox(
            proxy.url_for(srv.url), "lz4", 1 << 24, actor_index=0, refs=prod.refs, reply_timeout=1.0
        )
        try:
            prod.step(box, 10)
            box.seal(0)
            assert box.drain(10)  # (the first push also loads the push script)
            prod.step(box, 5)
            proxy.mode = "drop_replies"
            box.seal(0)
            client = redis.Redis.from_url(srv.url)
            wait_for(lambda: client.llen(KEYS.incoming) == 2, what="the push to reach Redis")
            wait_for(lambda: box.stats().push_failed >= 1, what="the lost reply to time out")
            assert proxy.dropped_bytes > 0 and box.stats().pushed == 12
            proxy.mode = "pass"
            assert box.drain(20)
            st = box.stats()
            assert st.duplicates == 1 and st.pushed == 12 + 10 and st.buffered == 0
            batches, _ = stored(srv.url)
            assert [len(b) for b in batches] == [12, 10]  # once, not twice
            prod.step(box, 5)  # later pushes go on as usual
            box.seal(0)
            assert box.drain(10) and client.llen(KEYS.incoming) == 3
        finally:
            box.close()
            srv.stop()


def test_the_env_loop_never_waits_on_a_hung_redis(tmp_path):
    """redis-server SIGSTOPped (every call hangs until its timeout): sealing,
    throttling and draining return at once; the pushes wait in the outbox, and
    are stored after SIGCONT."""
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", 1 << 24, actor_index=0, refs=prod.refs, reply_timeout=30.0)
    stop = threading.Event()
    try:
        prod.step(box, 10)
        box.seal(0)
        assert box.drain(10)
        os.kill(srv.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        for _ in range(5):
            prod.step(box, 10)
            box.seal(0)
            box.throttle(stop)
        assert not box.drain(0.5)  # the push in flight hangs: not drained
        assert time.monotonic() - t0 < 10  # far below the 30 s a push waits for its reply
        assert box.stats().buffered == 5 * 20 and box.stats().pushed == 12
        os.kill(srv.pid, signal.SIGCONT)
        assert box.drain(30)
        assert box.stats().pushed == 12 + 100
    finally:
        os.kill(srv.pid, signal.SIGCONT)
        box.close()
        srv.stop()


def test_throttle_waits_for_the_budget_and_is_bounded(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", 1 << 24, actor_index=0, refs=prod.refs)
    client = redis.Redis.from_url(srv.url)
    stop = threading.Event()
    try:
        client.set(KEYS.budget, 0)
        prod.step(box, 10)
        box.seal(0)
        assert box.drain(10) and box._allowance == (12, 0)
        calls = []

        def on_wait() -> None:  # the learner catches up after two polls
            calls.append(1)
            if len(calls) == 2:
                client.set(KEYS.budget, 100)

        t0 = time.monotonic()
        box.throttle(stop, on_wait)
        assert len(calls) >= 2 and time.monotonic() - t0 < THROTTLE_MAX_S
        assert box._allowance == (12, 100)  # the pusher refreshed it meanwhile
        # A learner that never catches up holds an actor at most THROTTLE_MAX_S.
        client.set(KEYS.budget, 0)
        prod.step(box, 5)
        box.seal(0)
        assert box.drain(10)
        t0 = time.monotonic()
        box.throttle(stop)
        assert THROTTLE_MAX_S <= time.monotonic() - t0 < THROTTLE_MAX_S + 2
        # and stop() ends a wait at once
        threading.Timer(0.2, stop.set).start()
        t0 = time.monotonic()
        box.throttle(stop)
        assert time.monotonic() - t0 < 1.5
    finally:
        box.close()
        srv.stop()


def test_close_counts_what_it_could_not_push(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    prod = Producer()
    box = ReplayOutbox(srv.url, "lz4", 1 << 24, actor_index=0, refs=prod.refs)
    prod.step(box, 10)
    box.seal(0)
    assert box.drain(10)
    srv.kill()
    prod.step(box, 10)
    box.seal(0)
    box.close(timeout=1.0)
    st = box.stats()
    assert st.pushed == 12 and st.dropped == 20 and st.buffered == 0
    srv.stop()
