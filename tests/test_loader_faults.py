"""The learner's data source survives replay outages (issue 9, learner side).

Real processes, killed for real: a redis-server killed with SIGKILL under
running loader processes and restarted on the same port and data directory; a
shard Ray actor (max_restarts=-1) killed with SIGKILL under the sampler.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from replay_server.endpoints import endpoints, pair
from replay_server.loader import DataSource
from replay_server.protocol import ReplayUnavailable
from replay_server.redis_proc import EmbeddedRedis
from replay_server.remote import RemoteShard
from replay_server.sampler import SLOT_MASK, ReplaySampler
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter
from tests.test_replay_loader import expected_stacks, wait_for
from tests.test_replay_sampler import filled_shard


def test_redis_killed_and_restarted_under_the_loader(tmp_path, make_pong_actor, pong_frames):
    server = EmbeddedRedis(str(tmp_path / "redis"), appendonly=True)
    try:
        rec: dict = {}
        shard = filled_shard(server.url, make_pong_actor, pong_frames, pushes=2, record=rec)
        sampler = ReplaySampler(pair([shard], endpoints([server.url])), min_size=1, seed=0)
        with DataSource(sampler, batch_size=32, workers=2, prefetch=1, timeout=0.5) as data:
            assert wait_for(lambda: data.sample(0.4), 30, "a first batch") is not None
            server.kill()  # SIGKILL: acknowledged writes are in the AOF already

            # The learner keeps asking: it gets the prefetched batches, then None,
            # and the source says since when the replay is unavailable.
            def outage() -> bool:
                data.sample(0.4)
                return data.status().unavailable_s is not None

            wait_for(outage, 30, "the outage")
            # batches fetched before the kill may still arrive; then only None
            wait_for(lambda: data.sample(0.4) is None, 30, "the fetched batches to run out")
            st = data.status()
            assert st.unavailable_s is not None and "unavailable" in st.last_outage
            server.restart()  # same port, data directory and passwords: it reloads its AOF
            batch = wait_for(lambda: data.sample(0.4), 60, "batches after the restart")
            st = data.status()
            assert st.unavailable_s is None and st.outages == 1 and st.outage_s > 0
            assert st.restarts == 0
            obs, nxt = expected_stacks(rec, batch.keys & SLOT_MASK)
            assert np.array_equal(batch.obs, obs) and np.array_equal(batch.next_obs, nxt)
    finally:
        server.stop()


def test_shard_actor_killed_under_the_sampler(ray_local, redis_url, make_pong_actor, pong_frames):
    ray = ray_local
    cls = ray.remote(ReplayShard).options(max_concurrency=4, max_restarts=-1)
    handle = cls.remote(redis_url, 5000, snapshot_seconds=0.2)
    ray.get(handle.start.remote())
    writer = ReplayWriter(redis_url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    for _ in range(4):
        fids, frames, batch = actor.push(10)
        writer.push(fids, frames, batch, 0, 0)
    shard = RemoteShard(handle, timeout=10.0)
    wait_for(lambda: shard.stats().size >= 100, 30, "the shard to ingest")
    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=100, seed=0)
    try:
        with DataSource(sampler, batch_size=32, workers=1, prefetch=1, timeout=0.5) as data:
            assert wait_for(lambda: data.sample(0.4), 30, "a first batch") is not None
            os.kill(pid, signal.SIGKILL)
            # Keep taking batches while Ray restarts the actor and it reloads its
            # index from Redis: the learner sees at most None, never an error.
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                data.sample(0.4)
                try:
                    new = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=1)
                except (ray.exceptions.RayError, TimeoutError):
                    continue
                if new != pid:
                    break
            assert new != pid, "the shard actor was not restarted"
            got = [wait_for(lambda: data.sample(0.4), 30, "batches after the restart")]
            got += [data.sample(0.4) for _ in range(3)]
            assert all(b is not None and len(b) == 32 for b in got)
            assert data.status().unavailable_s is None
    finally:
        ray.kill(handle, no_restart=True)
    # Permanently dead: an outage for the caller (it waits), not a crash.
    with pytest.raises(ReplayUnavailable, match="replay shard is unavailable"):
        shard.sample(8)
