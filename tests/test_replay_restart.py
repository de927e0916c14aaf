"""Crash recovery: kill -9 the shard process and its redis-server, restart both on
the same data dir, and find the transitions, priorities and frames again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import redis

from replay_server.endpoints import endpoints, pair
from replay_server.redis_proc import EmbeddedRedis
from replay_server.sampler import SLOT_MASK, ReplaySampler
from replay_server.shard import ReplayShard

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import numpy as np
from replay_server.shard import ReplayShard
from bench.synthetic import SyntheticActor, pong_frames
from replay_server.writer import ReplayWriter

url = sys.argv[1]
shard = ReplayShard(url, capacity=500, snapshot_seconds=3600)
writer = ReplayWriter(url)
actor = SyntheticActor(writer.incarnation, num_envs=4, frame_pool=pong_frames(4, 50))
for _ in range(8):                                  # 8 x ~80 transitions: evicts
    fids, frames, batch = actor.push(20)
    writer.push(fids, frames, batch, 0, 0)
    shard.ingest()
keys = np.arange(shard.index.first, shard.index.next)
prios = (keys % 13 + 1).astype(np.float32)
shard.update_priorities(keys, prios)
shard.snapshot()
late = shard.sample(8).keys                 # updated after the snapshot: lost
shard.update_priorities(late, np.full(8, 1000.0))
print(json.dumps({"stats": shard.stats().as_dict(), "keys": keys.tolist(), "prios": prios.tolist(),
                  "late": late.tolist()}), flush=True)
time.sleep(3600)
"""


def test_restart_after_kill_9_finds_transitions_and_priorities(tmp_path):
    data = str(tmp_path / "redis")
    server = EmbeddedRedis(data, appendonly=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, server.url], stdout=subprocess.PIPE, cwd=ROOT, env=env
    )
    try:
        line = child.stdout.readline()
        assert line, "child shard process died"
        before = json.loads(line)
        client = redis.Redis.from_url(server.url)
        deadline = time.monotonic() + 20  # a busy disk can postpone the write (aof_delayed)
        while time.monotonic() < deadline:
            info = client.info("persistence")
            if not info.get("aof_buffer_length") and not info.get("aof_pending_bio_fsync"):
                break
            time.sleep(0.2)
        client.close()
        child.kill()
        server.kill()
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
        server.kill()
    server = EmbeddedRedis(data, port=server.port, password=server.password)
    try:
        shard = ReplayShard(server.url, capacity=500)
        st, bst = shard.stats(), before["stats"]
        for name in ("size", "inserted_total", "evictions", "frames_stored", "frame_groups"):
            assert getattr(st, name) == bst[name], name
        keys = np.array(before["keys"])
        got = shard.get_priorities(keys)
        late = np.isin(keys, before["late"])
        np.testing.assert_array_equal(got[~late], np.array(before["prios"])[~late])
        assert (got[late] != 1000.0).all()  # after the last snapshot: not kept (documented)
        # Frames are all there: a full batch, every row kept, stacks decodable.
        sampler = ReplaySampler(pair([shard], endpoints([server.url])), min_size=1, seed=0)
        batch = sampler.sample(256, 0.4)
        assert len(batch) == 256 and sampler.stats().dropped_rows == 0
        assert set((batch.keys & SLOT_MASK).tolist()) <= set(before["keys"])
        # And it keeps working: ingest continues from the same slot numbers.
        assert shard.ingest() == 0 and shard.stats().size == bst["size"]
    finally:
        server.stop()
