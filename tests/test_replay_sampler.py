"""ReplaySampler and RateLimiter with real Redis and real writers (loader processes:
tests/test_replay_loader.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import redis

from common.types import TransitionBatch
from replay_server.endpoints import endpoints, pair
from replay_server.keys import ReplayKeys
from replay_server.rate_limiter import RateLimiter
from replay_server.records import SLOT_BITS
from replay_server.sampler import SLOT_MASK, ReplaySampler
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter


def filled_shard(
    url, make_actor, pool, pushes, steps=10, envs=4, seed=0, record=None, **kw
) -> ReplayShard:
    """A shard holding ``pushes`` real pushes. ``record`` (a dict), if given,
    gets ``frames`` {frame id: frame} and ``batches`` (the pushes in slot order)."""
    shard = ReplayShard(url, capacity=kw.pop("capacity", 10_000), seed=seed, **kw)
    writer = ReplayWriter(url)
    actor = make_actor(writer.incarnation, num_envs=envs, frame_pool=pool, seed=seed)
    for _ in range(pushes):
        fids, frames, batch = actor.push(steps)
        writer.push(fids, frames, batch, 0, 0)
        if record is not None:
            record.setdefault("frames", {}).update(zip(fids.tolist(), frames, strict=True))
            record.setdefault("batches", []).append(batch)
        shard.ingest()
    return shard


def delete_early_frames(url: str, pushed: TransitionBatch) -> np.ndarray:
    """Delete from Redis the frames of the first third of the transitions that
    no transition of the last third uses. Returns bool[n]: which transitions
    (slot order) still have all their frames; the last third always does."""
    ids = np.concatenate([pushed.obs_ids, pushed.next_obs_ids], axis=1)
    n = len(ids)
    doomed = np.setdiff1d(ids[: n // 3], ids[n - n // 3 :])
    client = redis.Redis.from_url(url)
    assert client.delete(*ReplayKeys().frames(doomed)) == len(doomed) > 0
    client.close()
    return ~np.isin(ids, doomed).any(axis=1)


def test_importance_weights_on_known_priorities(redis_url, make_pong_actor, pong_frames):
    alpha, beta = 0.5, 0.7
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2, alpha=alpha)
    n = shard.stats().size
    prios = (np.arange(n) % 7 + 1).astype(np.float32)
    shard.update_priorities(np.arange(n), prios)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=1, seed=0)
    batch = sampler.sample(128, beta)
    slots = batch.keys & SLOT_MASK
    p = prios[slots].astype(np.float64) ** alpha / (prios.astype(np.float64) ** alpha).sum()
    w = (n * p) ** -beta
    np.testing.assert_allclose(batch.weights, w / w.max(), rtol=1e-5)
    assert batch.weights.max() == 1.0
    # The lowest priority gets the largest weight.
    assert batch.weights[prios[slots] == prios[slots].min()].min() == 1.0


def test_two_shards_are_sampled_in_proportion_to_total_priority(
    redis_url, make_pong_actor, pong_frames
):
    url_b = redis_url[: redis_url.rfind("/")] + "/1"  # a second database of the same server
    a = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2, seed=1, alpha=1.0)
    b = filled_shard(url_b, make_pong_actor, pong_frames, pushes=2, seed=2, alpha=1.0)
    na, nb = a.stats().size, b.stats().size
    a.update_priorities(np.arange(na), np.full(na, 1.0))
    b.update_priorities(np.arange(nb), np.full(nb, 3.0 * na / nb))  # total_b = 3 * total_a
    sampler = ReplaySampler(pair([a, b], endpoints([redis_url, url_b])), min_size=1, seed=0)
    counts = np.zeros(2)
    for _ in range(40):
        batch = sampler.sample(100, beta=1.0)
        shard = batch.keys >> SLOT_BITS
        counts += np.bincount(shard, minlength=2)
        # beta=1: weight ~ 1/P(i) globally, whichever shard i lives in.
        expect = np.where(shard == 0, 1.0, na / (3.0 * nb))
        if (shard == 0).any():
            np.testing.assert_allclose(batch.weights, expect, rtol=1e-5)
    frac_b = counts[1] / counts.sum()
    assert abs(frac_b - 0.75) < 4 * np.sqrt(0.75 * 0.25 / counts.sum()), frac_b
    # Priority updates are routed back to the shard named in the key.
    batch = sampler.sample(50, beta=1.0)
    sampler.update_priorities(batch.keys, np.full(len(batch), 42.0))
    for k, shard_obj in enumerate((a, b)):
        mine = batch.keys[(batch.keys >> SLOT_BITS) == k] & SLOT_MASK
        assert (shard_obj.get_priorities(mine) == 42.0).all()


def test_rows_whose_frames_vanished_are_dropped(redis_url, make_pong_actor, pong_frames):
    rec: dict = {}
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=2, record=rec)
    intact = delete_early_frames(redis_url, TransitionBatch.concat(rec["batches"]))
    assert 0 < intact.sum() < len(intact)
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=1, seed=0)
    batch = sampler.sample(200, 0.4)
    assert batch is not None and 0 < len(batch) < 200
    batch.validate()
    assert intact[batch.keys & SLOT_MASK].all(), "a row with a deleted frame was kept"
    assert sampler.stats().dropped_rows == 200 - len(batch)


def test_rate_limiter_arithmetic():
    lim = RateLimiter(min_size=100, samples_per_insert=2.0, tolerance=50)
    assert not lim.try_acquire(10, inserted=99, size=99)  # below min_size
    assert lim.try_acquire(50, inserted=100, size=100)  # the tolerance
    assert not lim.try_acquire(1, inserted=100, size=100)
    assert lim.try_acquire(20, inserted=110, size=110)  # 2 * 10 new inserts
    assert not lim.try_acquire(1, inserted=110, size=110)
    lim.release(5)
    assert lim.try_acquire(5, inserted=110, size=110)
    unlimited = RateLimiter(min_size=10, samples_per_insert=0.0)
    assert unlimited.try_acquire(10**6, inserted=10, size=10)
    resumed = RateLimiter(min_size=100, samples_per_insert=4.0, tolerance=64)
    assert resumed.try_acquire(64, inserted=10**6, size=1000)  # no burst after a resume
    assert not resumed.try_acquire(64, inserted=10**6, size=1000)
    # The replay lost its data (size 0, inserted cumulative) and was refilled:
    # 100 new inserts bring 400 samples of allowance; the learner waited, so it
    # gets only the tolerance, as at the start of a run, not a burst of 400.
    assert not resumed.try_acquire(64, inserted=10**6, size=0)
    assert resumed.try_acquire(64, inserted=10**6 + 100, size=100)
    assert not resumed.try_acquire(1, inserted=10**6 + 100, size=100)
    assert resumed.try_acquire(4, inserted=10**6 + 101, size=101)  # then the ratio


def test_rate_limiter_holds_the_ratio_with_real_writers(redis_url, pong_frames, make_pong_actor):
    spi, min_size, tol = 4.0, 200, 128
    shard = ReplayShard(redis_url, capacity=50_000, seed=0)
    shard.start()
    stop = threading.Event()

    def write(seed: int) -> None:
        writer = ReplayWriter(redis_url)
        actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames, seed=seed)
        while not stop.is_set():
            fids, frames, batch = actor.push(5)  # ~20 transitions
            writer.push(fids, frames, batch, seed, 0)
            time.sleep(0.05)

    writers = [threading.Thread(target=write, args=(s,)) for s in range(2)]
    for t in writers:
        t.start()
    sampler = ReplaySampler(
        pair([shard], endpoints([redis_url])),
        min_size=min_size,
        samples_per_insert=spi,
        tolerance=tol,
        wait_timeout=0.5,
    )
    try:
        sampled, checks, nones = 0, 0, 0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            batch = sampler.sample(64, 0.4)
            if batch is None:
                nones += 1
                continue
            sampled += len(batch)
            inserted = shard.stats().inserted_total  # read after the sample: an upper bound
            assert sampled <= spi * (inserted - min_size) + tol, (sampled, inserted)
            checks += 1
        assert checks > 10
        # The limiter, not the sampler's own speed, set the pace while writers ran.
        assert sampler.stats().limiter_wait_s > 0.5, sampler.stats()
        stop.set()
        for t in writers:
            t.join()
        time.sleep(0.2)
        t0 = time.monotonic()
        while sampler.sample(64, 0.4) is not None:  # use up the remaining budget
            assert time.monotonic() - t0 < 10
        assert 0.45 < time.monotonic() - t0 < 15  # then it waited wait_timeout and gave up
    finally:
        stop.set()
        for t in writers:
            t.join()
        shard.stop()


def test_min_size_gates_sampling(redis_url, make_pong_actor, pong_frames):
    shard = filled_shard(redis_url, make_pong_actor, pong_frames, pushes=1)
    n = shard.stats().size
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), min_size=n + 1, wait_timeout=0.1)
    assert sampler.sample(8, 0.4) is None
    assert (
        ReplaySampler(pair([shard], endpoints([redis_url])), min_size=n).sample(8, 0.4) is not None
    )


def test_rows_keep_their_shards_frames_when_another_shard_lost_frames(
    redis_url, make_pong_actor, pong_frames
):
    urls = [redis_url, redis_url[: redis_url.rfind("/")] + "/1"]
    # Both writers start at the same incarnation, so frame ids repeat across
    # shards with different frames: a row stacked from the wrong shard shows.
    recs: list[dict] = [{}, {}]
    shards = [
        filled_shard(url, make_pong_actor, pong_frames, pushes=3, seed=k, record=recs[k])
        for k, url in enumerate(urls)
    ]
    frames_by_id = [r["frames"] for r in recs]
    pushed = [TransitionBatch.concat(r["batches"]) for r in recs]
    # Shard 0 loses frames: its rows drop while shard 1's rows follow in the batch.
    intact = delete_early_frames(urls[0], pushed[0])

    sampler = ReplaySampler(pair(shards, endpoints(urls)), min_size=1, seed=0)
    seen = np.zeros(2, int)
    sizes = []
    for _ in range(4):
        batch = sampler.sample(200, 0.4)
        batch.validate()
        sizes.append(len(batch))
        shard_of = batch.keys >> SLOT_BITS
        slots = batch.keys & SLOT_MASK
        seen += np.bincount(shard_of, minlength=2)
        for k in (0, 1):
            m = shard_of == k
            if not m.any():
                continue
            exp = pushed[k]
            obs = np.stack([[frames_by_id[k][i] for i in r] for r in exp.obs_ids[slots[m]]])
            nxt = np.stack([[frames_by_id[k][i] for i in r] for r in exp.next_obs_ids[slots[m]]])
            assert np.array_equal(batch.obs[m], obs), f"shard {k}: stacks from other frames"
            assert np.array_equal(batch.next_obs[m], nxt)
            assert np.array_equal(batch.actions[m], exp.actions[slots[m]])
        assert intact[slots[shard_of == 0]].all(), "a row with a deleted frame was kept"
    assert seen.min() > 0, seen
    assert sampler.stats().dropped_rows == 4 * 200 - seen.sum()
    # Dropped rows leave the sum tree (weight 0: never drawn again); intact rows stay.
    assert sizes[0] < 200, sizes
    weight = shards[0].index.tree.get(np.arange(len(intact)) % shards[0].capacity)
    assert (weight[intact] > 0).all()
    assert 0 < shards[0].stats().removed == int((weight[~intact] == 0).sum())
    assert shards[1].stats().removed == 0
