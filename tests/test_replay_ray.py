"""ReplayShard as a Ray actor (max_concurrency > 1) behind RemoteShard."""

from __future__ import annotations

import time

import numpy as np

from replay_server.endpoints import endpoints, pair
from replay_server.remote import RemoteShard
from replay_server.sampler import SLOT_MASK, ReplaySampler
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter


def test_shard_as_ray_actor_feeds_the_sampler(ray_local, redis_url, pong_frames, make_pong_actor):
    ray = ray_local
    handle = ray.remote(ReplayShard).options(max_concurrency=4).remote(redis_url, 5000)
    ray.get(handle.start.remote())
    writer = ReplayWriter(redis_url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    for _ in range(5):
        fids, frames, batch = actor.push(10)
        writer.push(fids, frames, batch, 0, 0)
    shard = RemoteShard(handle)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=100, wait_timeout=10.0)
    batch = sampler.sample(64, 0.4)  # waits for the actor's ingest thread
    assert batch is not None and len(batch) == 64
    batch.validate()
    sampler.update_priorities(batch.keys, np.full(64, 9.0))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = ray.get(handle.get_priorities.remote(batch.keys & SLOT_MASK))
        if (got == 9.0).all():
            break
        time.sleep(0.05)
    assert (got == 9.0).all()
    assert shard.stats().size >= 100
    ray.get(handle.stop.remote())
    ray.kill(handle)
