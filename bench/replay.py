"""Replay benchmark: storage cost, insert and sample throughput, frame codecs.

Prints ONE JSON object. Every figure comes with the baseline measured in the
same run (same machine, same moment):

* ``bytes_per_transition``: Redis ``used_memory`` growth per stored transition
  (frames, records, frame groups, priority snapshot; Redis key overhead
  included) after inserting ``--transitions`` real Pong transitions, against
  naive stacked ``s, s'`` (2 x 4 x 84 x 84 = 56,448 B). ``memory_2m_*`` scales
  it to a 2,000,000-transition replay (measured with ``--transitions 2000000``,
  else extrapolated; the key says which).
* ``insert_ratio``: transitions/s stored (2 writer processes pushing, the shard
  ingesting in this process; the whole backlog counted until drained) /
  transitions/s of 2 processes doing raw pipelined SETs (one per value) of the
  same payload sizes. ``insert_ratio_vs_raw_mset`` is the stricter baseline
  (one MSET per push, as the writer itself does).
* ``sample_ratio``: transitions/s of ``ReplaySampler.sample(512)`` (prioritized,
  MGET + decode + stack, one thread) / transitions/s of gathering the same
  batches from an in-memory numpy ring of uncompressed frames by fancy indexing.
* ``codecs``: bytes/frame and encode/decode MB/s (raw frame bytes per second)
  per codec, in the per-frame Python calls the replay really makes.

    python bench/replay.py                    # defaults: 100k transitions
    python bench/replay.py --transitions 20000 --insert-seconds 3   # quick
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import SyntheticActor, pong_frames  # noqa: E402
from common.types import FRAME_BYTES, TransitionBatch  # noqa: E402
from common.wire import CODEC_IDS, FrameCodec, encode_batch, train_zstd_dictionary  # noqa: E402
from replay_server.keys import ReplayKeys  # noqa: E402
from replay_server.redis_proc import EmbeddedRedis  # noqa: E402
from replay_server.sampler import PrefetchLoader, ReplaySampler  # noqa: E402
from replay_server.shard import ReplayShard  # noqa: E402
from replay_server.writer import ReplayWriter  # noqa: E402

NAIVE_BYTES = 2 * 4 * FRAME_BYTES
ID_SHIFT = 1 << 30  # fresh frame ids when a writer replays its pre-made pushes


def codec_table(frames: np.ndarray, decode_n: int = 3534) -> dict:
    """bytes/frame and encode/decode MB/s of raw frame bytes for each codec."""
    dictionary = train_zstd_dictionary(frames[: len(frames) // 2])
    test = frames[len(frames) // 2 :]
    out = {}
    for name in CODEC_IDS:
        codec = FrameCodec(name, dictionary if name == "zstd-dict" else None)
        t = time.perf_counter()
        blobs = codec.encode(test)
        enc = time.perf_counter() - t
        many = (blobs * (decode_n // len(blobs) + 1))[:decode_n]
        reps, t = 5, time.perf_counter()
        for _ in range(reps):
            codec.decode(many)
        dec = (time.perf_counter() - t) / reps
        out[name] = {
            "bytes_per_frame": round(float(np.mean([len(b) for b in blobs])), 1),
            "ratio": round(FRAME_BYTES / float(np.mean([len(b) for b in blobs])), 1),
            "encode_MBps": round(len(test) * FRAME_BYTES / enc / 1e6, 1),
            "decode_MBps": round(decode_n * FRAME_BYTES / dec / 1e6, 1),
            "decode_us_per_frame": round(dec / decode_n * 1e6, 2),
        }
    return out


def make_pushes(pool, incarnation, n_transitions, envs, steps, seed):
    actor = SyntheticActor(incarnation, num_envs=envs, frame_pool=pool, seed=seed)
    pushes, n = [], 0
    while n < n_transitions:
        fids, frames, batch = actor.push(steps)
        pushes.append((fids, frames, batch))
        n += len(batch)
    return pushes


def shifted(push, r):
    fids, frames, b = push
    off = np.int64(r * ID_SHIFT)
    return (
        fids + off,
        frames,
        TransitionBatch(
            b.obs_ids + off, b.next_obs_ids + off, b.actions, b.returns, b.discounts, b.priorities
        ),
    )


def _writer_proc(url, codec, pool, mode, seconds, envs, steps, seed, start, result):
    if mode == "replay":
        writer = ReplayWriter(url, codec)
        pushes = make_pushes(pool, writer.incarnation, 4000, envs, steps, seed)
    else:
        client = redis.Redis.from_url(url)
        pushes = make_pushes(pool, 0, 4000, envs, steps, seed)
        codec_obj = FrameCodec(codec if codec != "zstd-dict" else "zstd")
        raw = [(codec_obj.encode(fr), encode_batch(b, 0, 0, f)) for f, fr, b in pushes]
    start.wait()
    t0, n, i = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        r, j = divmod(i, len(pushes))
        if mode == "replay":
            fids, frames, batch = shifted(pushes[j], r)
            writer.push(fids, frames, batch, seed, 0)
            n += len(batch)
        else:
            blobs, payload = raw[j]
            pipe = client.pipeline(transaction=False)
            base = f"raw:{seed}:{i}:".encode()
            if mode == "raw-mset":
                pipe.mset({base + str(k).encode(): blob for k, blob in enumerate(blobs)})
            else:
                for k, blob in enumerate(blobs):
                    pipe.set(base + str(k).encode(), blob)
            pipe.set(base + b"b", payload)
            pipe.execute()
            n += len(pushes[j][2])
        i += 1
    result.put((n, time.perf_counter() - t0))


def run_writers(url, codec, pool, mode, seconds, envs, steps, procs=2):
    ctx = mp.get_context("fork")
    start, result = ctx.Event(), ctx.Queue()
    ps = [
        ctx.Process(
            target=_writer_proc,
            args=(url, codec, pool, mode, seconds, envs, steps, s, start, result),
        )
        for s in range(procs)
    ]
    for p in ps:
        p.start()
    time.sleep(0.5)
    start.set()
    t0 = time.perf_counter()
    out = [result.get() for _ in ps]
    for p in ps:
        p.join()
    return sum(n for n, _ in out), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--env", default="pong", help="ALE game name for the frames")
    ap.add_argument("--codec", default="lz4", choices=list(CODEC_IDS))
    ap.add_argument("--transitions", type=int, default=100_000, help="stored for the memory figure")
    ap.add_argument(
        "--pool-steps", type=int, default=500, help="real env steps x 8 envs of distinct frames"
    )
    ap.add_argument("--envs", type=int, default=16, help="envs per actor push")
    ap.add_argument("--steps", type=int, default=25, help="vector steps per push")
    ap.add_argument("--insert-seconds", type=float, default=8.0)
    ap.add_argument("--sample-batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()

    pool = pong_frames(8, args.pool_steps, game=args.env)
    res: dict = {"env": args.env, "codec": args.codec, "naive_bytes_per_transition": NAIVE_BYTES}
    res["codecs"] = codec_table(pool)

    with EmbeddedRedis(None, appendonly=False) as server:
        client = redis.Redis.from_url(server.url)
        # ---- bytes per transition ------------------------------------------
        shard = ReplayShard(server.url, capacity=max(args.transitions, 1) * 2, seed=0)
        base = int(client.info("memory")["used_memory"])
        writer = ReplayWriter(server.url, args.codec)
        actor = SyntheticActor(writer.incarnation, num_envs=args.envs, frame_pool=pool)
        frames_pushed = 0
        while shard.stats().size < args.transitions:
            fids, frames, batch = actor.push(args.steps)
            writer.push(fids, frames, batch, 0, 0)
            frames_pushed += len(fids)
            shard.ingest()
        shard.snapshot()
        used = int(client.info("memory")["used_memory"])
        size = shard.stats().size
        bpt = (used - base) / size
        frame_b = res["codecs"][args.codec]["bytes_per_frame"]
        res["bytes_per_transition"] = round(bpt, 1)
        res["bytes_per_transition_goal"] = 600
        res["frames_per_transition"] = round(frames_pushed / size, 3)
        res["stored_transitions"] = size
        res["redis_used_GB_measured"] = round((used - base) / 1e9, 3)  # at stored_transitions
        key = "measured" if size >= 2_000_000 else "extrapolated"
        res[f"memory_2m_redis_GB_{key}"] = round(bpt * 2e6 / 1e9, 2)
        res["memory_2m_shard_process_GB_estimated"] = round(
            (shard._rec.itemsize + 4 + 16) * 2e6 / 1e9, 2
        )  # records + raw priorities + sum tree (2x leaves, float64), in the shard process
        res["bytes_per_transition_other_codecs_estimated"] = {
            name: round(bpt + (c["bytes_per_frame"] - frame_b) * frames_pushed / size, 1)
            for name, c in res["codecs"].items()
        }
        # ---- sampling ------------------------------------------------------
        sampler = ReplaySampler([shard], [server.url], args.codec, min_size=1, seed=0)
        sampler.sample(args.batch, 0.4)
        t = time.perf_counter()
        got = sum(len(sampler.sample(args.batch, 0.4)) for _ in range(args.sample_batches))
        ours = got / (time.perf_counter() - t)  # batches are dropped at once, as a learner does
        # Baseline: the same batches from a numpy ring of raw frames (one core).
        draws = [shard.sample(args.batch) for _ in range(args.sample_batches)]
        all_ids = np.unique(
            np.concatenate([np.concatenate([d.obs_ids, d.next_obs_ids]).ravel() for d in draws])
        )
        ring = pool[np.arange(all_ids.size) % len(pool)].copy()  # uncompressed frames in RAM
        idx = [
            (np.searchsorted(all_ids, d.obs_ids), np.searchsorted(all_ids, d.next_obs_ids))
            for d in draws
        ]
        t = time.perf_counter()
        for o, n in idx:
            ring[o], ring[n]  # noqa: B018 (the gather is the work)
        base_rate = args.batch * len(idx) / (time.perf_counter() - t)
        res["sample_transitions_per_s"] = round(ours, 1)
        res["sample_baseline_numpy_ring_per_s"] = round(base_rate, 1)
        res["sample_ratio"] = round(ours / base_rate, 3)
        res["sample_ratio_goal"] = 0.2
        # Loader threads: do 2 workers beat 1 (is the GIL released enough)?
        for workers in (1, 2):
            loader = PrefetchLoader(lambda: sampler.sample(args.batch, 0.4), workers, 4)
            loader.get(timeout=30)
            t, n = time.perf_counter(), 0
            for _ in range(args.sample_batches):
                n += len(loader.get(timeout=30))
            res[f"loader_{workers}_workers_per_s"] = round(n / (time.perf_counter() - t), 1)
            loader.close()
        res["loader_2_over_1"] = round(
            res["loader_2_workers_per_s"] / res["loader_1_workers_per_s"], 2
        )
        shard.client.close()
        client.flushall()

        # ---- inserts -------------------------------------------------------
        shard = ReplayShard(server.url, capacity=200_000, seed=0)
        stop = threading.Event()

        def ingest_loop():
            while not stop.is_set():
                if shard.ingest(256) == 0:
                    time.sleep(0.002)

        th = threading.Thread(target=ingest_loop, daemon=True)
        th.start()
        pushed, secs = run_writers(
            server.url, args.codec, pool, "replay", args.insert_seconds, args.envs, args.steps
        )
        t_end = time.perf_counter()
        while client.llen(ReplayKeys().incoming) > 0 and time.perf_counter() - t_end < 120:
            time.sleep(0.05)
        drain = time.perf_counter() - t_end
        stop.set()
        th.join()
        stored = shard.stats().inserted_total
        ours_ins = stored / (secs + drain)
        client.flushall()
        raw_n, raw_secs = run_writers(
            server.url, args.codec, pool, "raw", args.insert_seconds, args.envs, args.steps
        )
        raw_rate = raw_n / raw_secs
        client.flushall()
        mset_n, mset_secs = run_writers(
            server.url, args.codec, pool, "raw-mset", args.insert_seconds, args.envs, args.steps
        )
        res["insert_baseline_raw_mset_per_s"] = round(mset_n / mset_secs, 1)
        res["insert_ratio_vs_raw_mset"] = round(ours_ins / (mset_n / mset_secs), 3)
        res["insert_transitions_per_s"] = round(ours_ins, 1)
        res["insert_push_only_per_s"] = round(pushed / secs, 1)
        res["insert_baseline_raw_set_per_s"] = round(raw_rate, 1)
        res["insert_ratio"] = round(ours_ins / raw_rate, 3)
        res["insert_ratio_goal"] = 0.3
        res["insert_backlog_drain_s"] = round(drain, 2)
    res["cpus"] = os.cpu_count()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
