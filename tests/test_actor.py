"""ApexActor against real ALE, real Redis and real Ray.

What is checked: the actor's stacks equal ale-py's own 4-stacks (across a
truncation), stacks never mix episodes and the n-step ends are right through the
whole actor (Catch), pushed frame ids resolve to stored frames (each frame
stored once), the bounded local buffer and backoff while Redis is down, and a
kill -9 of the actor's process under Ray.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import redis
import torch

from actors.actor import ApexActor
from common.catch import CELL_H, PAD, ROWS
from common.config import Config
from common.types import COUNTER_BITS
from common.wire import FrameCodec, decode_batch
from replay_server.endpoints import endpoints
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import EmbeddedRedis

KEYS = ReplayKeys()


def make_cfg(env: str, envs: int, **actor: object) -> Config:
    cfg = Config()
    cfg.env.env = env
    cfg.actor.actors = 2
    cfg.actor.envs_per_actor = envs
    for k, v in actor.items():
        setattr(cfg.actor, k, v)
    return cfg


def read_replay(url: str) -> tuple[list[dict], list, dict[int, np.ndarray]]:
    """(batch metas, TransitionBatches, {frame id: uint8[84, 84]}) stored in Redis."""
    client = redis.Redis.from_url(url)
    metas, batches = [], []
    for payload in client.lrange(KEYS.incoming, 0, -1):
        meta, batch = decode_batch(payload)
        metas.append(meta)
        batches.append(batch)
    frame_keys = [k for k in client.scan_iter(match=KEYS.frame_prefix + b"*", count=1000)]
    ids = [int.from_bytes(k[len(KEYS.frame_prefix) :], "big", signed=True) for k in frame_keys]
    frames = FrameCodec("lz4").decode(client.mget(frame_keys)) if frame_keys else []
    client.close()
    return metas, batches, dict(zip(ids, frames, strict=True))


def test_stacks_match_ale_stacking_across_truncation(redis_url):
    from ale_py.vector_env import AtariVectorEnv

    cfg = make_cfg("PongNoFrameskip-v4", 2, push_every=1000)
    cfg.env.max_episode_frames = 160  # 40 steps: force truncations
    actor = ApexActor(cfg, 0, redis_url)
    ref = AtariVectorEnv(
        "pong", 2, num_threads=1, stack_num=4, frameskip=4, maxpool=True, noop_max=30,
        img_height=84, img_width=84, grayscale=True, reward_clipping=False,
        episodic_life=False, repeat_action_probability=0.0, max_num_frames_per_episode=160,
        autoreset_mode="NextStep",
    )  # fmt: skip
    ref_obs, _ = ref.reset(seed=actor.env_seed)
    actor.run(max_steps=0)  # resets the envs
    truncations = 0
    firsts = [None, None]  # each env's current episode's first frame
    seen_stacks = []
    for step in range(100):
        if step:
            actor.run(max_steps=1)
            ref_obs, _, term, trunc, _ = ref.step(actor.last_actions)
            truncations += int(trunc.sum())
            assert not term.any()  # Pong does not end in 40 steps
        obs, ids = actor.current_stacks()
        for e in range(2):
            padded = [not ref_obs[e, k].any() for k in range(4)]
            if padded[2]:  # the stack holds only the new episode's first frame
                firsts[e] = ref_obs[e, 3]
            for k in range(4):
                want = firsts[e] if padded[k] else ref_obs[e, k]
                assert np.array_equal(obs[e, k], want), (step, e, k)
            seen_stacks.append((ids[e].copy(), obs[e].copy()))
    assert truncations >= 4  # two episode boundaries per env were crossed
    # ids and pixels agree: the same id always names the same frame
    by_id: dict[int, np.ndarray] = {}
    for stack_ids, stack in seen_stacks:
        for fid, frame in zip(stack_ids.tolist(), stack, strict=True):
            assert np.array_equal(by_id.setdefault(fid, frame), frame)
    actor.close()


def ball_row(frame: np.ndarray) -> int:
    rows = np.flatnonzero((frame == 255).any(axis=1))
    if rows.size == 0:  # caught: the paddle is drawn over the ball on the last row
        return ROWS - 1
    return int((rows[0] - PAD) // CELL_H)


def test_catch_stacks_never_mix_episodes_and_nstep_ends(redis_url):
    cfg = make_cfg("ApexCatch-v0", 4, push_every=7, n_step=3, gamma=0.9)
    actor = ApexActor(cfg, 1, redis_url)
    stats = actor.run(max_steps=60)
    metas, batches, frames = read_replay(redis_url)
    assert stats.transitions_pushed == sum(len(b) for b in batches) > 0
    assert {m["actor"] for m in metas} == {1}
    assert len(stats.episode_returns) >= 4 * 5  # 9-step episodes
    assert set(stats.episode_lengths) == {9}
    assert set(stats.episode_returns) <= {-1.0, 1.0}
    n_terminal = 0
    for b in batches:
        for i in range(len(b)):
            s = [ball_row(frames[f]) for f in b.obs_ids[i].tolist()]
            s2 = [ball_row(frames[f]) for f in b.next_obs_ids[i].tolist()]
            for rows in (s, s2):  # one episode: rows climb by 1, repeats only at the start
                for lo, hi in zip(rows, rows[1:], strict=False):
                    assert hi == lo + 1 or hi == lo == 0, rows
            if s2[-1] == ROWS - 1:  # s' is the terminal frame
                n_terminal += 1
                k = s2[-1] - s[-1]
                assert b.discounts[i] == 0.0
                assert abs(b.returns[i]) == pytest.approx(0.9 ** (k - 1))
            else:
                assert s2[-1] - s[-1] == 3
                assert b.discounts[i] == pytest.approx(0.9**3)
                assert b.returns[i] == 0.0
            assert b.priorities[i] > 0
    assert n_terminal >= 3 * len(stats.episode_returns) - 3
    actor.close()


def test_pushed_frame_ids_resolve_each_frame_stored_once(redis_url):
    cfg = make_cfg("pong", 4, push_every=10)
    actor = ApexActor(cfg, 0, redis_url, num_actors=1)
    stats = actor.run(max_steps=45)
    metas, batches, frames = read_replay(redis_url)
    inc = stats.incarnation
    assert inc is not None and stats.transitions_pushed == 45 * 4 - 4 * 2  # n-1 held
    assert sum(len(b) for b in batches) == stats.transitions_pushed
    assert len(metas) == stats.pushes == 5  # 4 in the loop + 1 final
    assert {m["policy_version"] for m in metas} == {0}
    assert len(frames) == 46 * 4  # the reset frames + one per env step, once each
    assert {f >> COUNTER_BITS for f in frames} == {inc}
    for b in batches:
        b.validate()
        used = np.concatenate([b.obs_ids.ravel(), b.next_obs_ids.ravel()])
        assert all(int(f) in frames for f in used)
    assert all(f.std() > 0 for f in frames.values())
    assert stats.frames == 4 * stats.env_steps == 4 * 45 * 4
    t = stats.time
    assert t["env"] > 0 and t["inference"] > 0 and t["push"] > 0
    assert stats.epsilon_max == pytest.approx(0.4) and stats.epsilon_min < 0.4**7
    actor.close()


def test_backoff_and_bounded_buffer_while_redis_is_down(tmp_path, caplog):
    data = tmp_path / "redis"
    srv = EmbeddedRedis(str(data))
    port, password = srv.port, srv.password
    cfg = make_cfg("ApexCatch-v0", 4, push_every=5, local_buffer_mb=0.01)  # ~10 KB
    actor = ApexActor(cfg, 0, srv.url)
    s1 = actor.run(max_steps=20)
    assert s1.transitions_pushed > 0 and s1.pushes_failed == 0
    srv.stop()
    t0 = time.monotonic()
    s2 = actor.run(max_steps=150)
    assert time.monotonic() - t0 < 30  # never blocks on the dead replay
    assert s2.transitions_pushed == s1.transitions_pushed
    assert s2.pushes_failed >= 1 and not s2.replay_ok
    # 150 steps x 4 envs, 9 of every 10 steps a transition (Catch: 9-step episodes,
    # then the NEXT_STEP reset step): ~540, in pushes of ~18; a Catch frame is ~100
    # bytes compressed, a transition's arrays ~80: the bound keeps ~10 KB (at least
    # the newest push, and the one in flight), the rest is dropped and counted
    assert s2.buffered_bytes <= 10 * 1024 + 2 * 20 * (100 + 80)
    assert s2.transitions_dropped >= 540 - 100
    assert s2.transitions_buffered + s2.transitions_dropped >= 540 - 20
    assert "replay unavailable" in caplog.text
    srv = EmbeddedRedis(str(data), port=port, password=password)  # reloads its AOF
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s3 = actor.run(max_steps=5)
            if s3.transitions_pushed > s2.transitions_pushed:
                break
        assert s3.replay_ok and s3.transitions_buffered == 0
        assert s2.transitions_buffered > 0  # what the bound kept is stored, none lost
        assert s3.transitions_pushed >= s2.transitions_pushed + s2.transitions_buffered
        assert s3.transitions_dropped == s2.transitions_dropped
        # the buffered transitions' frames were kept: every id resolves
        batches = assert_every_frame_id_resolves(srv.url)
        assert sum(len(b) for b in batches) == s3.transitions_pushed
    finally:
        actor.close()
        srv.stop()


def assert_every_frame_id_resolves(url: str) -> list:
    """Every frame id of every stored batch names a stored frame; returns the batches."""
    _, batches, frames = read_replay(url)
    for b in batches:
        ids = np.concatenate([b.obs_ids, b.next_obs_ids]).ravel()
        assert all(int(f) in frames for f in ids)
    return batches


def test_actor_starts_while_redis_is_down(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    url, port, password = srv.url, srv.port, srv.password
    srv.stop()
    actor = ApexActor(make_cfg("ApexCatch-v0", 2, push_every=5), 0, url)
    s1 = actor.run(max_steps=10)
    assert s1.transitions_pushed == 0 and s1.pushes_failed >= 1 and s1.incarnation is None
    srv = EmbeddedRedis(str(tmp_path / "r"), port=port, password=password)
    try:
        deadline = time.monotonic() + 30  # the backoff (0.25 s, doubling) must run out
        s2 = actor.run(max_steps=10)
        while s2.transitions_pushed == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            s2 = actor.run(max_steps=10)
        assert s2.transitions_pushed > 0 and s2.incarnation is not None
        assert_every_frame_id_resolves(url)
    finally:
        actor.close()
        srv.stop()


@pytest.mark.timeout(120)
def test_ray_restart_after_kill_keeps_index_and_epsilons(ray_local, redis_url):
    import ray

    remote_cls = ray.remote(max_restarts=-1, max_concurrency=2)(ApexActor)
    cfg = make_cfg("ApexCatch-v0", 2, push_every=5)
    handle = remote_cls.remote(cfg, 1, redis_url, None, 2)
    s1 = ray.get(handle.run.remote(max_steps=15), timeout=60)
    eps1 = ray.get(handle.epsilons.remote())
    pid = ray.get(handle.pid.remote())
    assert s1.transitions_pushed > 0 and not s1.restarted
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            s2 = ray.get(handle.stats.remote(), timeout=30)
            break
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            assert time.monotonic() < deadline, "actor was not restarted"
            time.sleep(0.2)
    assert ray.get(handle.pid.remote()) != pid
    assert s2.restarted and s2.actor == 1 and s2.transitions_pushed == 0
    assert ray.get(handle.epsilons.remote()) == eps1
    s3 = ray.get(handle.run.remote(max_steps=15), timeout=60)
    assert s3.transitions_pushed > 0 and s3.incarnation != s1.incarnation
    _, batches, frames = read_replay(redis_url)
    assert sum(len(b) for b in batches) == s1.transitions_pushed + s3.transitions_pushed
    ray.kill(handle)


def test_stop_from_another_thread_ends_run(redis_url):
    import threading

    actor = ApexActor(make_cfg("ApexCatch-v0", 2, push_every=5), 0, redis_url)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(actor.run()))
    thread.start()
    deadline = time.monotonic() + 30
    while not actor.stats(reset_episodes=False).episode_returns:  # 9-step episodes
        assert time.monotonic() < deadline and thread.is_alive(), "no episode ended"
        time.sleep(0.05)
    mid = actor.stats(reset_episodes=True)
    actor.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()
    result = results[0]
    assert result.vector_steps >= mid.vector_steps > 0
    # episodes were handed out once: the later stats hold only newer ones
    assert len(mid.episode_returns) > 0
    assert len(actor.stats().episode_returns) < len(mid.episode_returns) + 2 * (
        result.vector_steps - mid.vector_steps
    )
    actor.close()


def test_weights_are_polled_and_pushes_tagged(ray_local, redis_url):
    import ray

    from common.network import QNetwork, weights_to_numpy
    from common.weights import WeightStore

    store = ray.remote(WeightStore).remote()
    cfg = make_cfg("ApexCatch-v0", 2, push_every=2, weight_poll_steps=1)
    actor = ApexActor(cfg, 0, redis_url, weight_store=store, inference_dtype="float32")
    obs, _ = actor.current_stacks()
    actor.run(max_steps=4)
    assert actor.stats().weight_version == 0
    net = QNetwork(actor.num_actions, dueling=cfg.learner.dueling)
    weights = weights_to_numpy(net)
    ray.get(store.publish.remote(3, [ray.put(weights)]))
    deadline = time.monotonic() + 20
    while actor.stats().weight_version != 3:
        assert time.monotonic() < deadline, "weights never arrived"
        actor.run(max_steps=2)
    with torch.inference_mode():
        want = net(torch.from_numpy(actor.current_stacks()[0])).numpy()
    np.testing.assert_allclose(actor._policy.q_values(actor.current_stacks()[0]), want, atol=1e-5)
    actor.run(max_steps=6)
    metas, _, _ = read_replay(redis_url)
    versions = [m["policy_version"] for m in metas]
    assert versions[0] == 0 and versions[-1] == 3 and versions == sorted(versions)
    actor.close()
    ray.kill(store)


def linear_cfg(envs: int = 2, decay: int = 400) -> Config:
    return make_cfg(
        "ApexCatch-v0",
        envs,
        push_every=5,
        exploration="linear",
        eps_start=1.0,
        eps_end=0.0,
        eps_decay_frames=decay,
    )


def test_decaying_schedule_continues_from_schedule_frames(redis_url):
    from actors.exploration import decayed_epsilon

    actor = ApexActor(linear_cfg(), 0, redis_url)
    try:
        s1 = actor.run(max_steps=10)
        assert s1.schedule_frames == s1.frames == 10 * 2  # Catch: 1 frame per step
        s2 = actor.run(max_steps=5, schedule_frames=300)  # e.g. the frames of a crashed incarnation
        assert s2.frames == 15 * 2
        assert s2.schedule_frames == 300 + 5 * 2
        # epsilons of the last step were set before it stepped (frames 300 + 4 steps x 2 envs)
        expect = decayed_epsilon("linear", 1.0, 0.0, 400, 300 + 4 * 2)
        assert actor.epsilons() == pytest.approx([expect, expect])
        s3 = actor.run(max_steps=1)  # None: the schedule stays where it is
        assert s3.schedule_frames == 300 + 6 * 2
    finally:
        actor.close()


def test_fleet_restart_after_kill_continues_the_decaying_schedule(ray_local, redis_url):
    import ray

    from deploy.fleet import ActorFleet, start_weight_store

    cfg = linear_cfg(decay=100_000)
    cfg.actor.actors = 1
    store = start_weight_store()
    fleet = ActorFleet(cfg, endpoints([redis_url]), start_frames=1000)
    try:
        deadline = time.monotonic() + 60
        while fleet.poll(timeout=2.0).frames < 200:
            assert time.monotonic() < deadline, "the actor made no frames"
        before = fleet.actors[0].last
        assert before.schedule_frames == 1000 + before.frames  # the resumed share
        os.kill(ray.get(fleet.actors[0].handle.pid.remote()), signal.SIGKILL)
        while True:
            assert time.monotonic() < deadline + 60, "the killed actor never ran again"
            stats = fleet.poll(timeout=2.0)
            last = fleet.actors[0].last
            # 20 frames in: its epsilons have moved on from where the first one stopped
            # (after its first step they are still those of the first one's last step).
            if (
                fleet.actors[0].restarts
                and last is not None
                and last.restarted
                and last.frames >= 20
            ):
                break
        # The new incarnation counts its own frames from 0, but its schedule
        # goes on from the frames of the first one (not from 0 or from 1000).
        assert last.frames < before.frames + last.frames <= stats.frames
        assert last.schedule_frames >= 1000 + before.frames + last.frames
        assert last.epsilon_max < before.epsilon_max
    finally:
        fleet.stop()
        ray.kill(store)


def test_an_actor_that_cannot_start_stops_the_fleet_with_its_error(ray_local, redis_url):
    """Ray does not restart a failed constructor; the fleet must not call ``run`` on
    it forever either: the first poll after the failure raises FleetError."""
    import ray

    from deploy.fleet import ActorFleet, FleetError, start_weight_store

    cfg = make_cfg("ApexCatch-v0", 2)
    cfg.actor.actors = 1
    cfg.env.env = "NoSuchGame-v0"  # the launcher refuses it first; here the actor meets it
    store = start_weight_store()
    fleet = ActorFleet(cfg, endpoints([redis_url]))
    try:
        deadline = time.monotonic() + 60
        with pytest.raises(
            FleetError, match="actor 0 cannot start: .*unknown game 'NoSuchGame-v0'"
        ):
            while time.monotonic() < deadline:
                fleet.poll(timeout=1.0)
    finally:
        fleet.stop(timeout=5)
        ray.kill(store)
