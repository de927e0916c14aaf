"""bench/sizing.py: the sizing arithmetic on a tiny hand-made input, worked by hand
in the comments; the real bench files it reads by default; bad input."""

from __future__ import annotations

import json

import pytest

from bench.sizing import Plan, main, nature_dueling_params, size

ACTOR = {"actor_env_steps_per_s": 100.0, "envs": 4}
REPLAY = {
    "codec": "lz4",
    "bytes_per_transition": 500,
    "frames_per_transition": 1.0,
    "codecs": {"lz4": {"bytes_per_frame": 200}, "none": {"bytes_per_frame": 7058}},
    "insert_transitions_per_s": 10_000,
    "cpu_ms_per_batch": {
        "loader_1_procs": {"redis": 5.12, "loaders": 10.24, "this_process": 1.024}
    },
    "distinct_frames_per_batch": 1100,
    "memory_2m_shard_process_GB_estimated": 0.2,
}
LEARNER = {"updates_per_s_fed": 10, "batch_size": 64, "device_name": "a test CPU"}


def plan(**kw) -> Plan:
    base = dict(
        actors=60,
        envs=4,
        samples_per_insert=2.0,
        batch_size=256,
        capacity=1_000_000,
        cpus_per_node=8,
        redis_busy=0.5,
        frame_skip=4,
        publish_seconds=2.0,
        weight_bytes=10_000_000,
    )
    return Plan(**{**base, **kw})


def test_the_arithmetic_on_a_hand_made_input():
    r = size(plan(), ACTOR, REPLAY, LEARNER)
    # 60 actors x 100 steps/s = 6,000 inserts/s (x 4 = 24,000 frames/s); x 2 = 12,000 sampled
    assert r["rates"]["inserted_transitions_per_s"] == 6000
    assert r["rates"]["env_frames_per_s"] == 24_000
    assert r["rates"]["sampled_transitions_per_s"] == 12_000
    assert r["rates"]["learner_batches_per_s"] == 46.88  # 12,000 / 256 = 46.875
    # a redis-server samples 512 x 1000 / 5.12 ms = 100,000 transitions/s; busy:
    # 6,000 / 10,000 + 12,000 / 100,000 = 0.72 cores -> 2 shards under 0.5, 0.36 each
    rp = r["replay"]
    assert rp["shard_sample_limit_per_s"] == 100_000 and rp["shard_insert_limit_per_s"] == 10_000
    assert rp["redis_cores_all_shards"] == 0.72
    assert rp["shards"] == 2 and rp["redis_busy_per_shard"] == 0.36 and rp["cores"] == 4
    # 1M x 500 B = 0.5 GB (0.25 each); index 0.2 GB / 2M = 100 B -> 0.1 GB
    assert rp["redis_memory_GB"] == 0.5 and rp["redis_memory_GB_per_shard"] == 0.25
    assert rp["index_memory_GB"] == 0.1
    # 12,000 / 512 = 23.4375 reference batches/s x 10.24 ms = 0.24 loader cores
    assert r["learner_node"]["loader_cores"] == 0.24
    assert r["learner_node"]["draw_cores"] == 0.02  # x 1.024 ms = 0.024
    net = r["network_MBps"]
    assert net["actors_to_redis"] == 1.68  # 6,000 x (1 x 200 + 80 B)
    assert net["redis_to_learner"] == 6.12  # 23.4375 x (1,100 x 200 + 512 x 80 B) = 6.116
    assert r["actor_nodes"] == 8  # ceil(60 / 8)
    assert net["weights_into_each_actor_node"] == 5.0  # 10 MB every 2 s
    assert net["weights_out_of_learner_node_max"] == 40.0  # x 8 nodes
    # the learner: 10 x 64 = 640 transitions/s; 12,000 / 640 = 18.75 of them;
    # one keeps 640 / (2 x 100) = 3.2 actors busy
    ln = r["learner_node"]
    assert ln["learner_transitions_per_s"] == 640 and ln["learners_needed"] == 18.75
    assert ln["actors_one_learner_keeps_busy"] == 3.2
    assert r["notes"] == []  # the plan's E is the bench's
    assert r["inputs"]["replay:bytes_per_transition"]["value"] == 500


def test_overrides_and_notes():
    # an actor rate given instead of measured, a learner given as batches/s of the plan's batch
    r = size(plan(actor_steps_per_s=50.0, learner_batches_per_s=2.0), None, REPLAY, LEARNER)
    assert r["rates"]["inserted_transitions_per_s"] == 3000
    assert r["learner_node"]["learner_transitions_per_s"] == 512  # 2 x 256
    assert r["learner_node"]["learner_figure"].endswith("(given)")
    r = size(plan(envs=16), ACTOR, REPLAY)  # measured at 4 envs: said so
    assert (
        "measured at 4 envs" in r["notes"][0]
        and "learner_transitions_per_s" not in r["learner_node"]
    )
    assert size(plan(actors=1), ACTOR, REPLAY)["replay"]["shards"] == 1  # never 0
    # Redis twice as slow per batch (a bigger replay): 50,000 sampled/s per redis-server,
    # 6,000 / 10,000 + 12,000 / 50,000 = 0.84 cores -> still 2 shards, 0.42 each
    rp = size(plan(redis_ms_per_batch=10.24), ACTOR, REPLAY)["replay"]
    assert rp["shard_sample_limit_per_s"] == 50_000 and rp["redis_busy_per_shard"] == 0.42


def test_the_default_network_weighs_what_the_real_one_does():
    from common.network import QNetwork

    for actions in (6, 18):
        real = sum(p.numel() for p in QNetwork(actions).parameters())
        assert nature_dueling_params(actions) == real
    assert round(4 * nature_dueling_params(6) / 1e6, 1) == 13.2  # bench/evaluation's ray.put


@pytest.mark.parametrize(
    "replay, fragment",
    [
        (
            {k: v for k, v in REPLAY.items() if k != "bytes_per_transition"},
            "no 'bytes_per_transition'",
        ),
        ({**REPLAY, "insert_transitions_per_s": 0}, "must be a number above 0"),
        ({**REPLAY, "codec": "zstd"}, "no 'codecs.zstd.bytes_per_frame'"),
    ],
)
def test_bad_bench_json_is_named(replay, fragment):
    with pytest.raises(ValueError, match=fragment):
        size(plan(), ACTOR, replay)
    with pytest.raises(ValueError, match="--redis-busy"):
        size(plan(redis_busy=1.5), ACTOR, REPLAY)


def test_the_script_reads_the_committed_bench_results(capsys, tmp_path):
    assert main(["--actors", "360", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["plan"]["actors"] == 360 and r["replay"]["shards"] >= 1
    assert all(v["file"].startswith("bench/results/") for v in r["inputs"].values())
    assert main(["--actors", "8"]) == 0
    out = capsys.readouterr().out
    assert "replay shards" in out and "Redis -> learner MB/s" in out
    assert json.loads(out[out.index("\n{") :])["plan"]["actors"] == 8
    bad = tmp_path / "x.json"
    bad.write_text("[1]")
    assert main(["--actors", "8", "--replay", str(bad)]) == 2
    assert "expected one JSON object" in capsys.readouterr().err
