"""The replay under faults and hostile data, against real redis-server processes.

Each test owns its redis-server (an `EmbeddedRedis` on a free port in a tmp dir)
so that it can refuse writes, lose data or be killed without touching the others.
"""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import redis

from common.types import make_frame_id
from common.wire import encode_batch
from replay_server.keys import ReplayKeys
from replay_server.namespace import (
    NamespaceError,
    ReplayIdentity,
    inspect_namespace,
    reset_namespace,
)
from replay_server.protocol import ReplayUnavailable
from replay_server.records import RECORD_DTYPE, RECORDS_PER_CHUNK
from replay_server.redis_proc import EmbeddedRedis
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayReset, ReplayWriter

KEYS = ReplayKeys()
IDENTITY = ReplayIdentity("ALE/Pong-v5", 6, "lz4", 3, 0.99)


@pytest.fixture
def server(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "redis"))
    yield srv
    srv.stop()


def n_frames(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=KEYS.frame_pattern(), count=10_000))


def push(writer, actor, steps=10):
    fids, frames, batch = actor.push(steps)
    writer.push(fids, frames, batch, 0, 0)
    return fids, frames, batch


def test_refused_writes_lose_nothing_and_change_nothing(server, make_pong_actor, pong_frames):
    """OOM at maxmemory: pushes and ingests fail as outages, nothing is half-written,
    the index does not move; once memory is back, every queued push is stored."""
    client = redis.Redis.from_url(server.admin_url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    queued = [push(writer, actor)[2] for _ in range(3)]
    assert client.llen(KEYS.incoming) == 3
    frames_before = n_frames(client)
    client.config_set("maxmemory", 1)  # everything over the limit: writes refused
    with pytest.raises(ReplayUnavailable, match="unavailable|refused"):
        shard.ingest()
    assert shard.size == 0 and client.llen(KEYS.incoming) == 3  # nothing popped, nothing stored
    fids, frames, batch = actor.push(10)
    with pytest.raises(ReplayUnavailable):
        writer.push(fids, frames, batch, 0, 0)
    assert n_frames(client) == frames_before  # the refused push wrote no frame
    client.config_set("maxmemory", 0)
    writer.push(fids, frames, batch, 0, 0)  # the actor's retry of the same push
    stored = 0
    while (n := shard.ingest()) > 0:
        stored += n
    assert stored == sum(len(b) for b in queued) + len(batch) == shard.size
    assert client.llen(KEYS.incoming) == 0 and shard.stats().malformed == 0


def test_a_busy_redis_is_an_outage_not_an_error(server, make_pong_actor, pong_frames):
    """A script running past busy-reply-threshold makes Redis answer BUSY to
    everybody: pushes and ingests fail as outages (the actors buffer, the shard
    backs off and counts an outage; an error would make ingest retry at full
    speed forever), and once the script is killed every push is stored."""
    import threading

    admin = redis.Redis.from_url(server.admin_url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    queued = [push(writer, actor)[2] for _ in range(2)]
    admin.config_set("busy-reply-threshold", 50)  # ms (alias lua-time-limit)
    spinner = redis.Redis.from_url(server.admin_url)
    spin_error: list[Exception] = []

    def spin() -> None:
        try:
            spinner.eval("while true do end", 0)
        except redis.RedisError as exc:
            spin_error.append(exc)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    probe = redis.Redis.from_url(server.admin_url)
    deadline = time.monotonic() + 10
    while True:  # until Redis answers BUSY
        try:
            probe.ping()
        except redis.ResponseError as exc:
            assert str(exc).startswith("BUSY"), exc
            break
        assert time.monotonic() < deadline, "Redis never became busy"
    try:
        with pytest.raises(ReplayUnavailable, match="unavailable.*BUSY"):
            shard.ingest()
        fids, frames, batch = actor.push(10)
        with pytest.raises(ReplayUnavailable, match="BUSY"):
            writer.push(fids, frames, batch, 0, 0)
    finally:
        probe.script_kill()
        thread.join(timeout=10)
    assert spin_error and "killed" in str(spin_error[0]).lower()
    writer.push(fids, frames, batch, 0, 0)  # the actor's retry
    stored = 0
    while (n := shard.ingest()) > 0:
        stored += n
    assert stored == sum(len(b) for b in queued) + len(batch) == shard.size


def test_redis_back_empty_is_detected_and_refilled(server, make_pong_actor, pong_frames):
    client = redis.Redis.from_url(server.admin_url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    old_epoch = writer.epoch
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    for _ in range(3):
        push(writer, actor)
        shard.ingest()
    held = shard.size
    slots_before = shard.index.next
    assert held > 0
    client.flushall()  # what a restart on a lost volume looks like from here
    assert shard.ingest() == 0  # the round that notices
    st = shard.stats()
    assert st.resets == 1 and st.lost_in_resets == held and st.size == 0
    assert (
        shard.index.first == shard.index.next == slots_before
    )  # slots go on (old keys stay invalid)
    assert client.hget(KEYS.meta, "resets") == b"1"  # the namespace was started again
    assert ReplayIdentity.from_redis(client.hgetall(KEYS.identity)) == IDENTITY
    # The writer's old ids are void: its next push registers again and is retried.
    fids, frames, batch = actor.push(10)
    with pytest.raises(ReplayReset):
        writer.push(fids, frames, batch, 0, 0)
    # A new epoch: in it, incarnations are unique again (writers of the old epoch
    # can never write into the new one, so old and new numbers never meet).
    assert writer.epoch != old_epoch and writer.resets == 1
    fresh = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    push(writer, fresh)
    assert shard.ingest() > 0 and shard.size > 0  # refilling


def test_lost_newest_writes_are_detected_and_counted(tmp_path, make_pong_actor, pong_frames):
    """Redis restarts on an older copy of its AOF (a machine crash inside the fsync
    window): the shard reloads its index from what Redis holds and counts the rest."""
    data = tmp_path / "redis"
    srv = EmbeddedRedis(str(data))
    try:
        shard = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY)
        writer = ReplayWriter(srv.url)
        actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
        push(writer, actor)
        shard.ingest()
        kept = shard.size
        srv.stop()  # a clean stop flushes the AOF; copy it as "what reached the disk"
        shutil.copytree(data, tmp_path / "older")
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        for _ in range(3):
            push(writer, actor)
            shard.ingest()
        ahead, next_slot = shard.size, shard.index.next
        assert ahead > kept
        drawn = shard.sample(512).keys
        lost_keys = drawn[drawn >= kept]  # keys the learner may still hold
        assert lost_keys.size
        srv.kill()
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "older", data)
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        assert shard.ingest() == 0  # notices, reloads
        st = shard.stats()
        assert st.size == kept and st.lost == ahead - kept and st.resets == 0
        # slots are never reused: the lost ones stay unused, late updates miss
        assert shard.index.next == next_slot
        assert shard.update_priorities(lost_keys, np.ones(lost_keys.size)) == 0
        push(writer, actor)  # and goes on
        stored = shard.ingest()
        assert stored > 0 and shard.index.next == next_slot + stored  # after the gap
        # a restarted shard reads the same back: the skipped slots are not transitions
        again = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY)
        assert again.size == shard.size == kept + stored
        assert again.stats().dangling == shard.stats().dangling
    finally:
        srv.stop()


def _ahead_of_its_aof(tmp_path, make_pong_actor, pong_frames):
    """A shard whose index is ahead of an older copy of its Redis's AOF (kept in
    ``tmp_path / "older"``), and that Redis killed: the moment a lost-writes reload
    begins when Redis goes away again inside it."""
    data = tmp_path / "redis"
    srv = EmbeddedRedis(str(data))
    shard = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY, reply_timeout=5.0)
    writer = ReplayWriter(srv.url)
    actor = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
    push(writer, actor)
    shard.ingest()
    kept, kept_next = shard.size, shard.index.next
    srv.stop()
    shutil.copytree(data, tmp_path / "older")
    srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
    for _ in range(3):
        push(writer, actor)
        shard.ingest()
    assert shard.size > kept
    srv.kill()
    return srv, shard, writer, actor, kept, kept_next


def test_a_lost_writes_reload_cut_short_by_an_outage_is_finished_later(
    tmp_path, make_pong_actor, pong_frames
):
    """The shard found Redis's log shorter than its index and began to reload, and
    Redis went away inside the reload (it was still LOADING, or died again): the
    reload is finished by the next round that reaches Redis: the lost writes are
    counted once and their slots stay unused."""
    srv, shard, writer, actor, kept, kept_next = _ahead_of_its_aof(
        tmp_path, make_pong_actor, pong_frames
    )
    try:
        ahead, next_slot = shard.size, shard.index.next
        with pytest.raises(ReplayUnavailable):
            shard._reload(shard._epoch, kept_next)  # what ingest does on the shorter log
        data = tmp_path / "redis"
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "older", data)
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        assert shard.ingest() == 0  # loads, finishes the reload
        st = shard.stats()
        assert st.size == kept and st.lost == ahead - kept and st.resets == 0
        assert shard.index.next == next_slot  # the lost slots stay unused
        push(writer, actor)
        stored = shard.ingest()
        assert stored > 0 and shard.index.next == next_slot + stored
        assert shard.stats().lost == ahead - kept  # counted once
    finally:
        srv.stop()


def test_a_redis_found_empty_while_a_reload_is_pending_is_a_counted_reset(
    tmp_path, make_pong_actor, pong_frames
):
    """The same cut-short reload, then Redis back *empty*: a reset that drops and
    counts everything the index held (no index left pointing at records Redis no
    longer has), and the replay refills."""
    srv, shard, writer, actor, kept, kept_next = _ahead_of_its_aof(
        tmp_path, make_pong_actor, pong_frames
    )
    try:
        ahead = shard.size
        with pytest.raises(ReplayUnavailable):
            shard._reload(shard._epoch, kept_next)
        shutil.rmtree(tmp_path / "redis")
        srv = EmbeddedRedis(str(tmp_path / "redis"), port=srv.port, password=srv.password)
        shard.ingest()
        st = shard.stats()
        assert st.resets == 1 and st.lost_in_resets == ahead and st.size == 0, st
        assert redis.Redis.from_url(srv.admin_url).hget(KEYS.meta, "resets") == b"1"
        with pytest.raises(ReplayReset):  # the writer's old ids are void: it registers again
            push(writer, actor)
        fresh = make_pong_actor(writer.incarnation, num_envs=4, frame_pool=pong_frames)
        push(writer, fresh)
        assert shard.ingest() > 0  # refilling, from the slots after the old ones
        assert shard.stats().dangling == 0 and shard.stats().lost == 0
    finally:
        srv.stop()


def test_a_registration_lost_with_the_newest_writes_never_reuses_frame_ids(
    tmp_path, make_pong_actor, pong_frames
):
    """Redis restarts on an AOF without its newest writes, among them a writer's
    registration (INCR incarnation). That writer's later pushes are stored, not
    refused forever; the next registration gets a higher incarnation; and no
    frame of one writer is ever overwritten by another's."""
    data = tmp_path / "redis"
    srv = EmbeddedRedis(str(data))
    try:
        shard = ReplayShard(srv.url, capacity=5_000, identity=IDENTITY)
        w1 = ReplayWriter(srv.url)
        push(w1, make_pong_actor(w1.incarnation, num_envs=2, frame_pool=pong_frames))
        shard.ingest()
        srv.stop()  # what reached the disk
        shutil.copytree(data, tmp_path / "older")
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        w2 = ReplayWriter(srv.url)  # e.g. an actor Ray just restarted
        a2 = make_pong_actor(w2.incarnation, num_envs=2, frame_pool=pong_frames, seed=2)
        push(w2, a2)
        shard.ingest()
        srv.kill()  # a machine crash: the registration of w2 is lost with the rest
        shutil.rmtree(data)
        shutil.copytree(tmp_path / "older", data)
        srv = EmbeddedRedis(str(data), port=srv.port, password=srv.password)
        admin = redis.Redis.from_url(srv.admin_url)
        assert int(admin.get(KEYS.incarnation)) < w2.incarnation  # rolled back
        shard.ingest()  # notices the lost writes, reloads
        before = shard.stats()
        w2_frames = []
        for _ in range(3):
            w2_frames.append(push(w2, a2)[0])
            assert shard.ingest() > 0
        after = shard.stats()
        assert after.rejected == before.rejected  # w2 is not refused forever
        assert after.inserted_total > before.inserted_total
        assert int(admin.get(KEYS.incarnation)) >= w2.incarnation  # raised past it
        w3 = ReplayWriter(srv.url)  # the next registration
        assert w3.incarnation > w2.incarnation
        ids = np.concatenate(w2_frames)
        stored = admin.mget(KEYS.frames(ids))
        a3 = make_pong_actor(w3.incarnation, num_envs=2, frame_pool=pong_frames, seed=3)
        for _ in range(8):
            push(w3, a3)
            shard.ingest()
        assert admin.mget(KEYS.frames(ids)) == stored  # nothing of w2 overwritten
    finally:
        srv.stop()


def test_a_push_never_overwrites_a_stored_frame(server, make_pong_actor, pong_frames):
    """Two writers handed the same incarnation (the counter rolled back): the
    second one's push is refused as a whole, it registers again, and the first
    one's frames stay as they were."""
    admin = redis.Redis.from_url(server.admin_url)
    w1 = ReplayWriter(server.url)
    fids, _, _ = push(w1, make_pong_actor(w1.incarnation, num_envs=2, frame_pool=pong_frames))
    stored = admin.mget(KEYS.frames(fids))
    admin.set(KEYS.incarnation, w1.incarnation - 1)  # what a lost INCR leaves behind
    w2 = ReplayWriter(server.url)
    assert w2.incarnation == w1.incarnation
    incoming = admin.llen(KEYS.incoming)
    a2 = make_pong_actor(w2.incarnation, num_envs=2, frame_pool=pong_frames, seed=7)
    f2, fr2, b2 = a2.push(10)
    with pytest.raises(ReplayReset, match="nothing was overwritten"):
        w2.push(f2, fr2, b2, 0, 0)
    assert admin.mget(KEYS.frames(fids)) == stored
    assert admin.llen(KEYS.incoming) == incoming  # all or nothing: no batch queued
    assert w2.collisions == 1 and w2.incarnation > w1.incarnation


def test_hostile_records_are_rejected_and_counted(server, make_pong_actor, pong_frames):
    client = redis.Redis.from_url(server.url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    fids, frames, batch = actor.push(20)
    n = len(batch)
    bad = {
        0: ("actions", -5),
        1: ("actions", 99),
        2: ("actions", 2**40),
        3: ("discounts", 1e30),
        4: ("priorities", 3e38),
        5: ("returns", np.inf),
        6: ("priorities", np.nan),
        7: ("discounts", -0.5),
    }
    for row, (name, value) in bad.items():
        getattr(batch, name)[row] = value
    writer.push(fids, frames, batch, 0, 0)
    assert shard.ingest() == n - len(bad)
    st = shard.stats()
    assert st.rejected == len(bad) and st.size == n - len(bad)
    sample = shard.sample(4096)
    assert sample.actions.min() >= 0 and sample.actions.max() < 6
    assert (sample.discounts <= 1).all() and np.isfinite(sample.returns).all()
    # A push whose "new" frames claim another writer's incarnation is refused whole.
    other = make_frame_id(writer.incarnation + 50, np.arange(4))
    client.rpush(KEYS.incoming, encode_batch(batch, 0, 0, other))
    assert shard.ingest() == 0 and shard.stats().rejected == len(bad) + n


def test_unsampleable_rows_cannot_starve_sampling(server, make_pong_actor, pong_frames):
    """A huge-priority row whose frames are gone is removed from the sum tree."""
    client = redis.Redis.from_url(server.url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    push(writer, actor)
    shard.ingest()
    key = shard.sample(1).keys
    shard.update_priorities(key, np.array([3e38]))  # clipped to MAX_PRIORITY
    assert shard.get_priorities(key)[0] == pytest.approx(1e6)
    assert (shard.sample(64).keys == key[0]).mean() > 0.9  # it dominates sampling
    assert shard.remove(key) == 1
    assert (shard.sample(64).keys != key[0]).all()  # and is gone from it
    assert client.llen(KEYS.incoming) == 0


def test_orphan_frames_are_swept(server, make_pong_actor, pong_frames):
    client = redis.Redis.from_url(server.url)
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    push(writer, actor)
    shard.ingest()
    live = n_frames(client)
    # Orphans: frames nothing refers to (a push that never got ingested, e.g. its
    # batch was garbage) ...
    orphan_ids = make_frame_id(writer.incarnation, np.arange(10_000, 10_025))
    client.mset({k: b"x" for k in KEYS.frames(orphan_ids)})
    # ... and a queued push whose frames must survive the sweep.
    fids, frames, batch = actor.push(10)
    writer.push(fids, frames, batch, 0, 0)
    assert shard.sweep_orphans() == 25
    assert n_frames(client) == live + len(fids)
    assert shard.stats().orphans_collected == 25
    assert shard.ingest() == len(batch)  # the queued push still resolves
    assert shard.stats().dangling == 0


def test_namespace_identity_and_garbage_are_refused_before_use(
    server, make_pong_actor, pong_frames
):
    client = redis.Redis.from_url(server.admin_url)
    where = "test redis"
    args = dict(
        capacity=5_000,
        record_size=RECORD_DTYPE.itemsize,
        records_per_chunk=RECORDS_PER_CHUNK,
        where=where,
    )
    assert inspect_namespace(client, KEYS, IDENTITY, **args) == []  # empty: usable
    shard = ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    writer = ReplayWriter(server.url)
    actor = make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    push(writer, actor)
    shard.ingest()
    assert inspect_namespace(client, KEYS, IDENTITY, **args) == []
    breakout = ReplayIdentity("ALE/Breakout-v5", 4, "lz4", 3, 0.99)
    problems = inspect_namespace(client, KEYS, breakout, **args)
    assert any("Pong" in p and "Breakout" in p for p in problems)
    with pytest.raises(NamespaceError, match="other settings"):
        ReplayShard(server.url, capacity=5_000, identity=breakout)
    assert any(
        "capacity" in p
        for p in inspect_namespace(client, KEYS, IDENTITY, **{**args, "capacity": 9_000})
    )
    # Garbage: a foreign key, a key of the wrong type, metadata asking for 64 GiB.
    client.set(KEYS.prefix + b"zzz", b"1")
    client.delete(KEYS.groups)
    client.set(KEYS.groups, b"not a hash")
    problems = inspect_namespace(client, KEYS, IDENTITY, **args)
    assert any("unknown key" in p for p in problems) and any("groups" in p for p in problems)
    client.delete(KEYS.prefix + b"zzz", KEYS.groups)
    meta = client.hgetall(KEYS.meta)  # a meta key of the wrong type: reported, no WRONGTYPE
    client.delete(KEYS.meta)
    client.set(KEYS.meta, b"not a hash")
    problems = inspect_namespace(client, KEYS, IDENTITY, **args)
    assert any("meta" in p and "expected a hash" in p for p in problems), problems
    client.delete(KEYS.meta)
    client.hset(KEYS.meta, mapping=meta)
    assert inspect_namespace(client, KEYS, IDENTITY, **args) == []
    client.hset(KEYS.meta, "capacity", 1 << 45)
    assert any("capacity" in p for p in inspect_namespace(client, KEYS, IDENTITY, **args))
    with pytest.raises(NamespaceError):  # refused before allocating anything
        ReplayShard(server.url, capacity=5_000, identity=IDENTITY)
    # --replay-reset deletes the namespace and nothing else.
    client.set(b"someone-else", b"keep me")
    assert reset_namespace(client, KEYS, where) > 0
    assert list(client.scan_iter(match=KEYS.pattern())) == []
    assert client.get(b"someone-else") == b"keep me"
    assert inspect_namespace(client, KEYS, IDENTITY, **args) == []


def test_train_refuses_a_replay_of_other_settings_before_starting(
    server, make_pong_actor, pong_frames, tmp_path, monkeypatch, capsys
):
    """Through `apex-dqn train`: a Redis holding a Breakout replay stops a Pong run
    with exit 2 naming --replay-reset, before Ray starts; the replay is untouched."""
    from deploy.cli import main

    client = redis.Redis.from_url(server.admin_url)
    breakout = ReplayIdentity("ALE/Breakout-v5", 4, "lz4", 3, 0.99)
    shard = ReplayShard(server.url, capacity=5_000, identity=breakout)
    writer = ReplayWriter(server.url)
    push(writer, make_pong_actor(writer.incarnation, num_envs=2, frame_pool=pong_frames))
    shard.ingest()
    keys_before = sorted(client.scan_iter(match=KEYS.pattern()))
    monkeypatch.setenv("APEX_REDIS_URL", server.url)
    argv = ["train", "--env", "ALE/Pong-v5", "--capacity", "5000", "--min-replay", "100"]
    code = main([*argv, "--logdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "cannot be used by this run" in err and "--replay-reset" in err, err
    assert "Breakout" in err and server.password not in err
    assert sorted(client.scan_iter(match=KEYS.pattern())) == keys_before
