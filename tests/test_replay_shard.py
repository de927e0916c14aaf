"""ReplayShard + ReplayWriter against a real redis-server with real Pong frames."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import redis

from common.types import TransitionBatch, make_frame_id
from common.wire import FrameCodec, encode_batch
from replay_server.endpoints import endpoints, pair
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import EmbeddedRedis, ReplayUnavailable, connect
from replay_server.sampler import ReplaySampler
from replay_server.shard import ReplayShard
from replay_server.sum_tree import SumTree
from replay_server.writer import ReplayWriter

KEYS = ReplayKeys()


class Mirror:
    """What the test pushed: frames by id and transitions in slot order."""

    def __init__(self) -> None:
        self.frames: dict[int, np.ndarray] = {}
        self.batches: list[TransitionBatch] = []

    def add(self, fids, frames, batch) -> None:
        for i, f in zip(fids.tolist(), frames, strict=True):
            self.frames[i] = f
        self.batches.append(batch)

    @property
    def all(self) -> TransitionBatch:
        return TransitionBatch.concat(self.batches)


def fill(url, actor, shard, pushes, steps=25, codec="lz4", mirror=None, writer=None):
    writer = writer or ReplayWriter(url, codec)
    for _ in range(pushes):
        fids, frames, batch = actor.push(steps)
        writer.push(fids, frames, batch, actor=0, policy_version=0)
        if mirror is not None:
            mirror.add(fids, frames, batch)
        shard.ingest()
    return writer


def frame_keys(client) -> set[bytes]:
    return set(client.scan_iter(match=KEYS.frame_pattern(), count=10_000))


def test_sum_tree_matches_brute_force():
    rng = np.random.default_rng(1)
    tree = SumTree(1000)
    w = np.zeros(1000)
    for _ in range(50):
        idx = rng.choice(1000, 64, replace=False)
        val = rng.random(64) * 10 * (rng.random(64) > 0.2)
        tree.update(idx, val)
        w[idx] = val
    assert np.isclose(tree.total, w.sum())
    u = np.sort(rng.random(500)) * w.sum()
    assert np.array_equal(tree.find(u), np.searchsorted(np.cumsum(w), u, side="right"))
    assert (w[tree.sample(4096, rng)] > 0).all()  # zero-weight leaves are never drawn


@pytest.mark.parametrize("codec", ["lz4", "zstd-dict"])
def test_frames_stored_once_and_stacks_rebuilt_exactly(redis_url, make_pong_actor, codec):
    client = redis.Redis.from_url(redis_url)
    shard = ReplayShard(redis_url, capacity=10_000, seed=0)
    writer = ReplayWriter(redis_url, codec)
    actor = make_pong_actor(writer.incarnation, num_envs=4)
    mirror = Mirror()
    fill(redis_url, actor, shard, pushes=10, steps=20, mirror=mirror, writer=writer)
    everything = mirror.all
    n = len(everything)
    assert shard.stats().size == n == shard.stats().inserted_total
    # Each frame once: one key per pushed frame id, values of one encoded frame.
    stored = frame_keys(client)
    assert stored == set(KEYS.frames(np.array(list(mirror.frames), np.int64)))
    assert shard.stats().frames_stored == len(mirror.frames) == 4 * 201
    assert len(mirror.frames) < 2 * n  # frames are shared by stacks, not copied per transition
    if codec == "zstd-dict":
        assert client.get(KEYS.dictionary) is not None
        sizes = [client.strlen(k) for k in list(stored)[:200]]
        assert np.mean(sizes) < 200  # a dictionary beats plain lz4 (~265 B) on Pong
    # Rebuilt stacks equal the pushed ones, slot by slot.
    sampler = ReplaySampler(pair([shard], endpoints([redis_url])), codec, min_size=1, seed=0)
    batch = sampler.sample(256, beta=0.4)
    batch.validate()
    slots = batch.keys & ((1 << 56) - 1)
    exp_obs = np.stack([[mirror.frames[i] for i in row] for row in everything.obs_ids[slots]])
    exp_next = np.stack([[mirror.frames[i] for i in row] for row in everything.next_obs_ids[slots]])
    assert np.array_equal(batch.obs, exp_obs)
    assert np.array_equal(batch.next_obs, exp_next)
    assert np.array_equal(batch.actions, everything.actions[slots])
    assert np.array_equal(batch.returns, everything.returns[slots])
    assert np.array_equal(batch.discounts, everything.discounts[slots])


def test_fifo_eviction_frees_frames_no_live_transition_needs(redis_url, make_pong_actor):
    client = redis.Redis.from_url(redis_url)
    cap = 300
    shard = ReplayShard(redis_url, capacity=cap, seed=0)
    writer = ReplayWriter(redis_url)
    actor = make_pong_actor(writer.incarnation, num_envs=4)
    mirror = Mirror()
    for i in range(12):
        fill(redis_url, actor, shard, pushes=1, steps=20, mirror=mirror, writer=writer)
        everything = mirror.all
        n = len(everything)
        st = shard.stats()
        assert st.size == min(n, cap) and st.evictions == max(0, n - cap)
        lo = n - st.size
        needed = set(everything.obs_ids[lo:].ravel().tolist()) | set(
            everything.next_obs_ids[lo:].ravel().tolist()
        )
        stored = {int.from_bytes(k[-8:], "big", signed=True) for k in frame_keys(client)}
        assert needed <= stored, f"push {i}: a live transition lost a frame"
        # Slack: only frames of the push groups that still hold a live transition.
        assert len(stored - needed) <= 4 * 20 + 4, (
            f"push {i}: {len(stored - needed)} dead frames kept"
        )
        assert st.frames_stored == len(stored)
        # Samples come only from the live (newest) slots, in FIFO order.
        keys = shard.sample(64).keys
        assert keys.min() >= lo and keys.max() < n
    assert not any((make_frame_id(writer.incarnation, c) in stored) for c in range(40))
    # A priority update for an evicted slot is ignored; a live one applies.
    assert shard.update_priorities(np.array([0, n - 1]), np.array([5.0, 7.0])) == 1
    assert np.isnan(shard.get_priorities(np.array([0])))[0]
    assert shard.get_priorities(np.array([n - 1]))[0] == 7.0


def test_sampled_frequencies_follow_priorities(redis_url, make_pong_actor, pong_frames):
    alpha = 0.6
    shard = ReplayShard(redis_url, capacity=1000, alpha=alpha, seed=3)
    writer = ReplayWriter(redis_url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    fill(redis_url, actor, shard, pushes=1, steps=13, writer=writer)
    n = shard.stats().size
    keys = np.arange(n)
    prios = np.linspace(0.1, 5.0, n)
    shard.update_priorities(keys, prios)
    draws = np.concatenate([shard.sample(512).keys for _ in range(80)])
    expected = prios**alpha / (prios**alpha).sum() * draws.size
    observed = np.bincount(draws, minlength=n)
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < n + 5 * np.sqrt(2 * n), f"chi2={chi2:.1f} for {n} bins"
    uniform = np.full(n, draws.size / n)
    assert ((observed - uniform) ** 2 / uniform).sum() > 10 * n  # clearly not uniform


def test_malformed_entries_are_skipped_and_counted(redis_url, make_pong_actor, pong_frames):
    client = redis.Redis.from_url(redis_url)
    shard = ReplayShard(redis_url, capacity=1000)
    writer = ReplayWriter(redis_url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    fids, frames, batch = actor.push(10)
    good = msgpack.unpackb(encode_batch(batch, 0, 0, fids), raw=False)
    client.rpush(KEYS.incoming, b"\x00garbage", msgpack.packb({**good, "v": 99}))
    client.rpush(KEYS.incoming, msgpack.packb({**good, "returns": b"123"}))
    # Foreign keys: transitions referring to frames the replay never stored.
    foreign = TransitionBatch(
        obs_ids=np.full((3, 4), make_frame_id(999, 5)),
        next_obs_ids=np.full((3, 4), make_frame_id(999, 6)),
        actions=np.zeros(3, np.int64),
        returns=np.zeros(3, np.float32),
        discounts=np.ones(3, np.float32),
        priorities=np.ones(3, np.float32),
    )
    client.rpush(KEYS.incoming, encode_batch(foreign, 1, 0))
    writer.push(fids, frames, batch, 0, 0)
    assert shard.ingest() == len(batch)
    st = shard.stats()
    assert st.malformed == 3 and st.dangling == 3 and st.size == len(batch)


def test_unreachable_redis_is_reported_without_the_password(tmp_path, pong_frames, make_pong_actor):
    server = EmbeddedRedis(str(tmp_path), password="s3cret-pw")
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    fids, frames, batch = actor.push(5)
    writer.push(fids, frames, batch, 0, 0)
    url = server.url
    server.stop()
    with pytest.raises(ReplayUnavailable) as err:
        writer.push(fids, frames, batch, 0, 0)
    assert "s3cret-pw" not in str(err.value)
    with pytest.raises(
        ReplayUnavailable, match="cannot reach Redis at redis://apex:\\*\\*\\*@127"
    ) as err:
        connect(url, timeout=0.5)
    assert "s3cret-pw" not in str(err.value) and "omit --redis-url" in str(err.value)


def test_codec_frames_in_redis_decode(redis_url, pong_frames):
    client = redis.Redis.from_url(redis_url)
    writer = ReplayWriter(redis_url, "zstd")
    ids = make_frame_id(writer.incarnation, np.arange(5))
    batch = TransitionBatch(
        *(np.zeros((0, 4), np.int64),) * 2,
        np.zeros(0, np.int64),
        *(np.zeros(0, np.float32),) * 3,
    )
    writer.push(ids, pong_frames[:5], batch, 0, 0)
    blobs = client.mget(KEYS.frames(ids))
    assert np.array_equal(FrameCodec("lz4").decode(blobs), pong_frames[:5])
    assert client.llen(KEYS.incoming) == 1
