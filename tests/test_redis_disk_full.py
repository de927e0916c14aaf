"""Redis's own disk fills up: a real tmpfs (root only) under a real redis-server's
AOF, filled with a file until ENOSPC (~3 s).

Redis then refuses every write with ``MISCONF Errors writing to the AOF file``.
The replay must treat that as an outage, like OOM: a refused push writes
nothing and the actor keeps it to retry, a refused ingest moves nothing, and
once space is back every acknowledged push is stored, also in the AOF (a
restart reads them all back). Skipped, saying why, where no tmpfs can be
mounted.
"""

from __future__ import annotations

import time

import pytest
import redis

from bench.disks import fill_disk
from replay_server.keys import ReplayKeys
from replay_server.namespace import ReplayIdentity
from replay_server.protocol import ReplayUnavailable
from replay_server.redis_proc import EmbeddedRedis
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter

KEYS = ReplayKeys()
IDENTITY = ReplayIdentity("ALE/Pong-v5", 6, "lz4", 3, 0.99)


@pytest.fixture
def small_disk(tmpfs):
    return tmpfs("16m")


def n_frames(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=KEYS.frame_pattern(), count=10_000))


def test_a_full_disk_under_redis_is_an_outage_that_loses_nothing(
    small_disk, make_pong_actor, pong_frames
):
    data = small_disk / "redis"
    srv = EmbeddedRedis(str(data))
    try:
        admin = redis.Redis.from_url(srv.admin_url)
        shard = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY)
        writer = ReplayWriter(srv.url)
        actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
        acked = 0
        for _ in range(2):
            fids, frames, batch = actor.push(10)
            writer.push(fids, frames, batch, 0, 0)
            acked += len(batch)
        assert shard.ingest() > 0

        filler = fill_disk(small_disk)
        # Redis notices at its next AOF write: pushes until one is refused. One or
        # two may still be acknowledged (in memory, their AOF write pending).
        refused = None
        deadline = time.monotonic() + 20
        while refused is None:
            assert time.monotonic() < deadline, "Redis never refused a write on a full disk"
            fids, frames, batch = actor.push(10)
            before = n_frames(admin)
            try:
                writer.push(fids, frames, batch, 0, 0)
                acked += len(batch)
            except ReplayUnavailable as exc:
                refused = (exc, fids, frames, batch)
                assert n_frames(admin) == before  # the refused push wrote no frame
            time.sleep(0.05)
        exc, fids, frames, batch = refused
        assert "MISCONF" in str(exc), exc
        size = shard.size
        with pytest.raises(ReplayUnavailable, match="MISCONF"):
            shard.ingest()
        assert shard.size == size  # nothing moved

        filler.unlink()  # space is back: Redis writes its pending AOF and accepts again
        deadline = time.monotonic() + 20
        while True:
            try:
                writer.push(fids, frames, batch, 0, 0)  # the actor's retry of the same push
                acked += len(batch)
                break
            except ReplayUnavailable:
                assert time.monotonic() < deadline, "Redis kept refusing after space came back"
                time.sleep(0.1)
        while shard.ingest() > 0:
            pass
        assert shard.size == acked and shard.stats().malformed == 0
        assert admin.info("persistence")["aof_last_write_status"] == "ok"
        admin.close()

        # everything acknowledged reached the AOF: a restart reads it all back
        srv.stop()
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        again = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY)
        assert again.size == acked and again.stats().lost == 0
    finally:
        srv.stop()
