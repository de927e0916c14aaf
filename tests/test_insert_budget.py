"""InsertBudget (the insert side of the replay ratio) against a real redis-server
that is killed with SIGKILL and comes back empty, with a real writer pushing; and
ReplayRatioKeeper, which drives it from the rows the sampler delivers."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from replay_server.endpoints import endpoints, pair
from replay_server.rate_limiter import InsertBudget, ReplayRatio, ReplayRatioKeeper
from replay_server.redis_proc import EmbeddedRedis, connect
from replay_server.sampler import ReplaySampler
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayReset, ReplayWriter

SPI, MIN_SIZE, BATCH = 2.0, 100, 10  # tolerance: max(1000, 20 * 10 / 2) = 1000


@pytest.fixture
def server(tmp_path):
    s = EmbeddedRedis(str(tmp_path / "redis"), appendonly=False)  # a restart is empty
    yield s
    s.stop()


def push(writer: ReplayWriter, actor, pushes: int) -> int:
    """Push ``pushes`` real actor batches; return the pushed counter."""
    pushed = 0
    for _ in range(pushes):
        fids, frames, batch = actor.push(5)
        pushed, _ = writer.push(fids, frames, batch, 0, 0)
    return pushed


def test_budget_starts_again_when_redis_comes_back_empty(server, pong_frames, make_pong_actor):
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    pushed = push(writer, actor, 10)
    assert pushed > 0
    budget = InsertBudget(endpoints([server.url]), ReplayRatio(SPI, MIN_SIZE), BATCH)
    try:
        # the run started with `pushed` transitions in Redis: they do not count
        assert writer.allowance() == (pushed, pushed + MIN_SIZE + 1000)
        budget.update(2000)  # the learner drew 2000: 1000 more inserts allowed
        assert writer.allowance()[1] == pushed + MIN_SIZE + 1000 + 1000

        server.kill()  # SIGKILL; no AOF, no RDB: it comes back empty
        budget.update(2000)  # down: that shard keeps its budget, no error
        assert budget.restarts == 0
        server.restart()
        budget.update(2000)
        # Empty again: the budget starts as at the start of a run (a refill of
        # min_size, then the ratio), not from the lost counter (that would let
        # writers push 2 x `pushed` + 2,100 transitions before any throttle).
        assert writer.allowance() == (0, MIN_SIZE + 1000)
        assert budget.restarts == 1

        with pytest.raises(ReplayReset):  # the writer notices the loss, registers again
            fids, frames, batch = actor.push(5)
            writer.push(fids, frames, batch, 0, 0)
        actor.incarnation = writer.incarnation
        new = push(writer, actor, 3)
        assert new > 0
        budget.update(2400)  # the epoch the refill set is not a second loss
        assert budget.restarts == 1
        assert writer.allowance() == (new, MIN_SIZE + 200 + 1000)
    finally:
        budget.close()
        writer.close()


def test_budget_off_when_the_ratio_is_off(server):
    probe = connect(server.url)
    probe.set(b"apex:v2:budget", 5)  # left by an earlier run with a ratio
    budget = InsertBudget(endpoints([server.url]), ReplayRatio(0.0, MIN_SIZE), BATCH)
    try:
        budget.update(10_000)
        assert probe.get(b"apex:v2:budget") is None  # writers are not throttled
    finally:
        budget.close()
        probe.close()


def test_budget_is_split_over_shards(server, tmp_path):
    with EmbeddedRedis(str(tmp_path / "second"), appendonly=False) as other:
        clients = [connect(server.url), connect(other.url)]
        budget = InsertBudget(endpoints([server.url, other.url]), ReplayRatio(SPI, MIN_SIZE), BATCH)
        try:
            budget.update(400)  # (100 + 400 / 2 + 1000) / 2 = 650 each
            assert [int(c.get(b"apex:v2:budget")) for c in clients] == [650, 650]
        finally:
            budget.close()


def test_delivered_batches_drive_the_budget(server, pong_frames, make_pong_actor):
    """The replay ratio's one owner: rows the sampler delivers move the insert
    budget, through the keeper's thread (no monitor in between)."""
    shard = ReplayShard(server.url, capacity=5000, seed=0)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)

    def fill(pushes: int) -> None:
        push(writer, actor, pushes)
        while shard.ingest():
            pass

    fill(10)  # above min_size: sampling opens, credited as if the ratio had held
    ratio = ReplayRatio(SPI, MIN_SIZE)
    budget = InsertBudget(endpoints([server.url]), ratio, BATCH)
    keeper = ReplayRatioKeeper(ratio, budget=budget, interval=0.01).start()
    sampler = ReplaySampler(
        pair([shard], endpoints([server.url])), ratio=keeper, wait_timeout=0.1, malloc_tuning=False
    )
    probe = connect(server.url)
    try:
        assert sampler.limiter is keeper.limiter
        assert shard.size >= MIN_SIZE
        early = 0  # sampling opens credited as if the ratio had held: 2 batches of slack
        while (batch := sampler.sample(32, beta=0.4)) is not None:
            early += len(batch)
        assert early <= 64
        before = shard.size
        fill(20)
        assert SPI * (shard.size - before) >= 320 + 64  # room for 10 batches of 32
        for _ in range(10):
            batch = sampler.sample(32, beta=0.4)
            assert batch is not None and len(batch) == 32
        got = early + 320
        assert keeper.sampled == got == sampler.sampled
        # the budget started when the keeper did (its base: what was pushed then)
        want_share = int(MIN_SIZE + got / SPI + 1000)
        assert wait_for(
            lambda: int(probe.get(b"apex:v2:budget")) == budget.base[0] + want_share, 10.0
        )
    finally:
        keeper.close()
        probe.close()
        writer.close()
    assert connect(server.url).get(b"apex:v2:budget") is None  # writers let go at the end


def test_a_stalled_redis_does_not_stall_delivery(server):
    """The budget is written off the data path: with its Redis frozen (SIGSTOP),
    deliveries return at once and the budget catches up when it thaws."""
    ratio = ReplayRatio(SPI, MIN_SIZE)
    budget = InsertBudget(endpoints([server.url]), ratio, BATCH)
    keeper = ReplayRatioKeeper(ratio, budget=budget, interval=0.01).start()
    probe = connect(server.url)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        done = threading.Event()

        def deliver() -> None:
            for _ in range(100):
                keeper.delivered(20)
            done.set()

        threading.Thread(target=deliver, daemon=True).start()
        assert done.wait(5.0), "delivery waited on a frozen Redis"
    finally:
        os.kill(server.pid, signal.SIGCONT)
    try:
        want = MIN_SIZE + 2000 // 2 + 1000  # nothing pushed: base 0
        assert wait_for(lambda: int(probe.get(b"apex:v2:budget") or 0) == want, 20.0)
    finally:
        keeper.close()
        probe.close()


def wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()
