"""DataSource / BatchLoader: real loader processes, real Redis, real frames."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import redis

from common.types import TransitionBatch
from replay_server.endpoints import endpoints, pair
from replay_server.frames import FrameFetcher
from replay_server.keys import ReplayKeys
from replay_server.loader import DataSource
from replay_server.records import SLOT_BITS
from replay_server.sampler import SLOT_MASK, ReplaySampler
from tests.test_replay_sampler import filled_shard


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def expected_stacks(rec: dict, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pushed = TransitionBatch.concat(rec["batches"])
    f = rec["frames"]
    obs = np.stack([[f[i] for i in row] for row in pushed.obs_ids[slots]])
    nxt = np.stack([[f[i] for i in row] for row in pushed.next_obs_ids[slots]])
    return obs, nxt


def test_mget_command_names_the_frame_keys():
    ids = np.array([0, 1, 255, 1 << 40, -5], np.int64)
    cmd = FrameFetcher(["redis://127.0.0.1:1/0"]).mget_command(ids)
    keys = ReplayKeys().frames(ids)
    want = b"*6\r\n$4\r\nMGET\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in keys)
    assert cmd == want


def test_begun_fetches_finish_in_order_with_the_right_frames(
    redis_url, make_pong_actor, pong_frames
):
    """Two batches in flight on one connection (what a loader process does)."""
    rec: dict = {}
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2, record=rec)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=1, seed=3)
    fetcher = FrameFetcher([redis_url])
    draws = [sampler.draw(40) for _ in range(2)]
    frames = [np.zeros((2 * 40 * 4, 84, 84), np.uint8) for _ in draws]
    begun = [fetcher.begin(d.spans(), d.ids(), f, 40) for d, f in zip(draws, frames, strict=True)]
    for d, f, b in zip(draws, frames, begun, strict=True):
        assert fetcher.finish(b).ok.all()
        obs, nxt = expected_stacks(rec, np.concatenate([r.keys for _, r in d.parts]))
        assert np.array_equal(f[:160].reshape(40, 4, 84, 84), obs)
        assert np.array_equal(f[160:].reshape(40, 4, 84, 84), nxt)
    fetcher.close()


def test_loader_processes_deliver_the_replays_frames(redis_url, make_pong_actor, pong_frames):
    urls = [redis_url, redis_url[: redis_url.rfind("/")] + "/1"]
    recs: list[dict] = [{}, {}]
    shards = [
        filled_shard(url, make_pong_actor, pong_frames, pushes=3, seed=k, record=recs[k])
        for k, url in enumerate(urls)
    ]
    sampler = ReplaySampler(pair(shards, endpoints(urls)), min_size=1, seed=0)
    with DataSource(sampler, batch_size=96, workers=2, prefetch=2, timeout=30) as data:
        seen = np.zeros(2, int)
        for i in range(6):
            batch = data.sample(beta=0.0 if i == 0 else 1.0)
            assert batch is not None and len(batch) == 96
            batch.validate()
            shard_of, slots = batch.keys >> SLOT_BITS, batch.keys & SLOT_MASK
            seen += np.bincount(shard_of, minlength=2)
            for k in (0, 1):
                m = shard_of == k
                if m.any():
                    obs, nxt = expected_stacks(recs[k], slots[m])
                    assert np.array_equal(batch.obs[m], obs), f"shard {k}: wrong frames"
                    assert np.array_equal(batch.next_obs[m], nxt)
            if i == 0:  # beta reaches the weights when the learner takes the batch
                assert (batch.weights == 1.0).all()
            else:
                assert batch.weights.max() == 1.0 and batch.weights.min() < 1.0
        assert seen.min() > 0, seen
        st = data.status()
        assert st.batches == 6 and st.outages == 0 and st.unavailable_s is None
    assert sampler.stats().dropped_rows == 0


def test_a_held_batch_is_never_overwritten(redis_url, make_pong_actor, pong_frames):
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=1, seed=1)
    with DataSource(sampler, batch_size=32, workers=1, prefetch=1, timeout=30) as data:
        slots = data.loader.ring.layout.slots
        held = data.sample(0.4)
        copy = held.obs.copy(), held.next_obs.copy()
        for _ in range(3 * slots):  # every other slot is reused many times meanwhile
            assert data.sample(0.4) is not None
        assert np.array_equal(held.obs, copy[0]) and np.array_equal(held.next_obs, copy[1])
        free = data.loader.ring._free
        n_free = free.qsize()
        del held
        wait_for(lambda: free.qsize() > n_free, 5, "the held slot to return")


def test_a_killed_loader_process_is_restarted(redis_url, make_pong_actor, pong_frames):
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=1, seed=2)
    with DataSource(sampler, batch_size=32, workers=1, prefetch=1, timeout=30) as data:
        assert data.sample(0.4) is not None
        proc = data.loader.procs[0].proc
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: data.loader.procs[0].proc is not proc, 30, "a new loader process")
        for _ in range(3):
            assert data.sample(0.4) is not None
        assert data.status().restarts == 1


def test_a_non_outage_error_surfaces(redis_url, redis_server, make_pong_actor, pong_frames):
    """A Redis that refuses MGET for a reason that is not an outage (ACL: NOPERM)
    is a bug to report, not to wait out."""
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=1)
    admin = redis.Redis.from_url(redis_server.admin_url)
    admin.execute_command("ACL", "SETUSER", "nomget", "on", ">pw", "~*", "+@all", "-mget")
    try:
        url = f"redis://nomget:pw@127.0.0.1:{redis_server.port}/0"
        sampler = ReplaySampler(pair([shard], endpoints([url])), min_size=1)
        with DataSource(sampler, batch_size=16, workers=1, prefetch=1, timeout=10) as data:
            with pytest.raises(RuntimeError, match="NOPERM|permission"):
                for _ in range(3):
                    data.sample(0.4)
            assert data.status().outages == 0
    finally:
        admin.execute_command("ACL", "DELUSER", "nomget")
        admin.close()
