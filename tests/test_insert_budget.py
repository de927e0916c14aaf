"""InsertBudget (the insert side of the replay ratio) against a real redis-server
that is killed with SIGKILL and comes back empty, with a real writer pushing."""

from __future__ import annotations

import pytest

from replay_server.rate_limiter import InsertBudget, ReplayRatio
from replay_server.redis_proc import EmbeddedRedis, connect
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
    client = connect(server.url)
    budget = InsertBudget([client], ["shard 0"], ReplayRatio(SPI, MIN_SIZE), BATCH)
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
    budget = InsertBudget([connect(server.url)], ["shard 0"], ReplayRatio(0.0, MIN_SIZE), BATCH)
    try:
        budget.update(10_000)
        assert probe.get(b"apex:v2:budget") is None  # writers are not throttled
    finally:
        budget.close()
        probe.close()


def test_budget_is_split_over_shards(server, tmp_path):
    with EmbeddedRedis(str(tmp_path / "second"), appendonly=False) as other:
        clients = [connect(server.url), connect(other.url)]
        budget = InsertBudget(clients, ["shard 0", "shard 1"], ReplayRatio(SPI, MIN_SIZE), BATCH)
        try:
            budget.update(400)  # (100 + 400 / 2 + 1000) / 2 = 650 each
            assert [int(c.get(b"apex:v2:budget")) for c in clients] == [650, 650]
        finally:
            budget.close()
