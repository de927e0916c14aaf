"""One owner per replay: the lease in a real redis-server, a shard that lost it,
and `train` refusing a replay another run holds."""

from __future__ import annotations

import time

import pytest
import redis

from replay_server import lease
from replay_server.keys import ReplayKeys
from replay_server.namespace import NamespaceError
from replay_server.protocol import ReplayUnavailable
from replay_server.redis_proc import EmbeddedRedis
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter

KEYS = ReplayKeys()


@pytest.fixture
def server(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "redis"))
    yield srv
    srv.stop()


def other_run(logdir: str = "/elsewhere/run") -> lease.Owner:
    return lease.Owner("0123456789abcdef", "otherhost", 4242, logdir)


def test_a_held_lease_is_refused_naming_its_holder_until_it_ends(server):
    client = redis.Redis.from_url(server.url)
    a, b = other_run(), lease.Owner.this_run("/tmp/b")
    lease.acquire(client, KEYS, a, "here", ttl_ms=400)
    with pytest.raises(lease.LeaseHeld, match="host otherhost, pid 4242, logdir /elsewhere/run"):
        lease.acquire(client, KEYS, b, "here")
    deadline = time.monotonic() + 10  # nobody refreshes it: it ends by itself
    while client.exists(KEYS.owner):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lease.acquire(client, KEYS, b, "here")
    assert not lease.release(client, KEYS, a.encode())  # only the holder gives it back
    assert lease.release(client, KEYS, b.encode()) and not client.exists(KEYS.owner)


def test_a_run_on_the_same_logdir_takes_the_lease_over(server):
    """Only one process holds a logdir (common.locks): a lease naming ours is a
    dead run's (a --resume right after a kill -9 of the driver)."""
    client = redis.Redis.from_url(server.url)
    lease.acquire(client, KEYS, other_run("/runs/pong"), "here")
    me = lease.Owner.this_run("/runs/pong")
    lease.acquire(client, KEYS, me, "here")
    assert client.get(KEYS.owner) == me.encode().encode()


def leased_run(server, make_pong_actor, pong_frames, **shard_kw):
    """This run holds the lease; its shard has ingested one push of its actor."""
    me = lease.Owner.this_run("/runs/mine")
    client = redis.Redis.from_url(server.url)
    lease.acquire(client, KEYS, me, "here")
    shard = ReplayShard(server.url, capacity=5_000, owner=me.encode(), **shard_kw)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    fids, frames, batch = actor.push(10)
    writer.push(fids, frames, batch, 0, 0)
    assert shard.ingest() > 0
    return me, client, shard, writer, actor


def test_a_shard_that_lost_its_lease_stores_nothing(server, make_pong_actor, pong_frames):
    me, client, shard, writer, actor = leased_run(server, make_pong_actor, pong_frames)
    size = shard.size
    # our lease ran out (this Redis was unreachable) and another run took it
    client.set(KEYS.owner, other_run().encode(), px=60_000)
    fids, frames, batch = actor.push(10)
    writer.push(fids, frames, batch, 0, 0)
    with pytest.raises(NamespaceError, match="taken over by another run.*otherhost"):
        shard.ingest()
    assert shard.size == size and shard.lease_lost
    assert client.llen(KEYS.incoming) == 1  # the push stays for its owner
    with pytest.raises(NamespaceError):
        shard._beat()  # the heartbeat does not take it back either
    assert lease.Owner.decode(client.get(KEYS.owner)).host == "otherhost"


def test_train_refuses_a_replay_in_use(server, tmp_path, capsys):
    from deploy.cli import main

    client = redis.Redis.from_url(server.url)
    lease.acquire(client, KEYS, other_run(), "here")
    argv = ["train", "--env", "ApexCatch-v0", "--redis-url", server.url, "--max-updates", "1"]
    for extra in ([], ["--replay-reset"]):
        code = main([*argv, *extra, "--logdir", str(tmp_path / f"run{len(extra)}")])
        err = capsys.readouterr().err
        assert code == 2, err
        assert "is in use by another run (host otherhost, pid 4242" in err
    assert lease.Owner.decode(client.get(KEYS.owner)).pid == 4242  # untouched


def test_a_reply_lost_while_the_lease_is_watched_is_an_outage_not_a_takeover(
    server, make_pong_actor, pong_frames
):
    """redis-py raises WatchError also when a watched connection times out (a
    partition, a SIGSTOPped Redis): that is an outage, counted as one, and the
    lease stays ours. CLIENT PAUSE WRITE lets the round's reads through and holds
    its EXEC past the shard's reply timeout (1 s)."""
    me, client, shard, writer, actor = leased_run(
        server, make_pong_actor, pong_frames, reply_timeout=1.0
    )
    size = shard.size
    fids, frames, batch = actor.push(10)
    writer.push(fids, frames, batch, 0, 0)
    redis.Redis.from_url(server.admin_url).execute_command("CLIENT", "PAUSE", "2500", "WRITE")
    with pytest.raises(ReplayUnavailable):
        shard.ingest()
    assert not shard.lease_lost and shard.size == size
    deadline = time.monotonic() + 20  # the pause ends; the same push is stored once
    stored = 0
    while shard.size == size:
        assert time.monotonic() < deadline
        try:
            stored += shard.ingest()
        except ReplayUnavailable:
            time.sleep(0.1)
    assert stored == len(batch) and shard.size == size + len(batch) and not shard.lease_lost
    assert client.llen(KEYS.incoming) == 0
    assert client.get(KEYS.owner) == me.encode().encode()
