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
* ``sample_ratio``: transitions/s of ``ReplaySampler.sample(512)`` (prioritized
  draw, one MGET, frames decoded straight into the batch; one thread, so one
  core) / transitions/s of gathering the same batches from an in-memory numpy
  ring of uncompressed frames by fancy indexing (one core).
* ``loader_<N>_procs_per_s``: transitions/s a learner receives from
  `replay_server.loader.DataSource` with N loader processes (the production
  path: draws in this process, fetch + decode in the children, batches in shared
  memory); ``loader_scaling_<N>`` = N processes / 1 process, the median of
  ratios measured back to back (``--rounds``), so a busy machine hits both.
  ``loader_threads_2_over_1``: the same for 2 threads running ``sample`` in this
  process against 1 (what processes replaced).
* ``cpu_ms_per_batch``: CPU milliseconds each batch cost this process (draws,
  finishing; everything for in-process sampling), the loader processes and the
  Redis server, over the same timed windows. Unlike rates, these hardly change
  when other programs share the cores: N cores deliver at most N / (sum of the
  three) batches per millisecond.
* ``codecs``: bytes/frame and encode/decode MB/s (raw frame bytes per second)
  per codec, in the per-frame Python calls the replay really makes;
  ``decode_into_us_per_frame`` is the loader's path (`FrameCodec.decode_into`:
  straight into scattered rows of a batch-sized array).

    python bench/replay.py                    # defaults: 100k transitions
    python bench/replay.py --transitions 20000 --insert-seconds 3   # quick
    python bench/replay.py --transitions 2000000 --skip-inserts     # the 2M sampling figures
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import SyntheticActor, pong_frames  # noqa: E402
from common.types import FRAME_BYTES, FRAME_SHAPE, TransitionBatch  # noqa: E402
from common.wire import CODEC_IDS, FrameCodec, encode_batch, train_zstd_dictionary  # noqa: E402
from replay_server.endpoints import endpoints, pair  # noqa: E402
from replay_server.keys import ReplayKeys  # noqa: E402
from replay_server.loader import DataSource  # noqa: E402
from replay_server.redis_proc import EmbeddedRedis  # noqa: E402
from replay_server.sampler import ReplaySampler  # noqa: E402
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
        # decode_into: what the loader does (straight into scattered batch rows)
        dest = np.empty((2 * decode_n, *FRAME_SHAPE), np.uint8)
        rows = np.random.default_rng(0).permutation(len(dest))[:decode_n]
        codec.decode_into(many, dest, rows)
        t = time.perf_counter()
        for _ in range(reps):
            codec.decode_into(many, dest, rows)
        dec_into = (time.perf_counter() - t) / reps
        out[name] = {
            "bytes_per_frame": round(float(np.mean([len(b) for b in blobs])), 1),
            "ratio": round(FRAME_BYTES / float(np.mean([len(b) for b in blobs])), 1),
            "encode_MBps": round(len(test) * FRAME_BYTES / enc / 1e6, 1),
            "decode_MBps": round(decode_n * FRAME_BYTES / dec / 1e6, 1),
            "decode_us_per_frame": round(dec / decode_n * 1e6, 2),
            "decode_into_us_per_frame": round(dec_into / decode_n * 1e6, 2),
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


class CpuMeter:
    """CPU milliseconds per batch over a timed window: this process (draws,
    finishing, and in-process sampling), the loader processes, the Redis server."""

    def __init__(self, client: redis.Redis, loader_cpu=lambda: 0.0) -> None:
        self.client, self.loader_cpu = client, loader_cpu

    def _now(self) -> tuple[float, float, float]:
        me = resource.getrusage(resource.RUSAGE_SELF)
        info = self.client.info("cpu")
        return (
            me.ru_utime + me.ru_stime,
            self.loader_cpu(),
            info["used_cpu_user"] + info["used_cpu_sys"],
        )

    def start(self) -> None:
        self.t0 = self._now()

    def per_batch(self, batches: int) -> dict:
        t1 = self._now()
        ms = [1000 * (b - a) / batches for a, b in zip(self.t0, t1, strict=True)]
        return {
            "this_process": round(ms[0], 2),
            "loaders": round(ms[1], 2),
            "redis": round(ms[2], 2),
        }


def timed_batches(get, n: int, meter: CpuMeter | None = None) -> tuple[float, dict]:
    """Transitions/s of ``n`` batches from ``get()`` (after a warm-up that empties
    whatever was prefetched while idle), and CPU ms per batch (``meter``)."""
    for _ in range(6):
        get()
    if meter is not None:
        meter.start()
    t, rows = time.perf_counter(), 0
    for _ in range(n):
        rows += len(get())
    rate = rows / (time.perf_counter() - t)
    return rate, (meter.per_batch(n) if meter is not None else {})


def loader_rate(
    sampler: ReplaySampler, batch: int, procs: int, n: int, client: redis.Redis
) -> tuple[float, dict]:
    """Transitions/s a learner gets from a DataSource with ``procs`` loader processes."""
    with DataSource(sampler, batch, workers=procs, prefetch=4, timeout=60) as data:
        meter = CpuMeter(client, lambda: data.status().loader_cpu_s)
        return timed_batches(lambda: data.sample(0.4), n, meter)


def thread_rate(sampler: ReplaySampler, batch: int, threads: int, n: int) -> float:
    """Transitions/s of ``threads`` threads running ``sampler.sample`` into a queue."""
    q: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            b = sampler.sample(batch, 0.4)
            while not stop.is_set():
                try:
                    q.put(b, timeout=0.1)
                    break
                except queue.Full:
                    pass

    ts = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    try:
        return timed_batches(lambda: q.get(timeout=60), n)[0]
    finally:
        stop.set()
        for t in ts:
            t.join()


def loader_figures(sampler: ReplaySampler, args, client: redis.Redis) -> dict:
    """Loader processes (1, 2, ... up to the cores) and threads (1, 2), measured
    in alternating rounds; each scaling figure is the median of per-round ratios."""
    procs = [1, 2] + [p for p in (4, 8, 16) if p <= (os.cpu_count() or 1)]
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for p in procs:
            rate, ms = loader_rate(sampler, args.batch, p, args.sample_batches, client)
            rates.setdefault(f"p{p}", []).append(rate)
            cpu.setdefault(f"loader_{p}_procs", []).append(ms)
        for t in (1, 2):
            rates.setdefault(f"t{t}", []).append(
                thread_rate(sampler, args.batch, t, args.sample_batches)
            )
    out: dict = {}
    for p in procs:
        out[f"loader_{p}_procs_per_s"] = round(statistics.median(rates[f"p{p}"]), 1)
    for p in procs[1:]:
        ratios = [a / b for a, b in zip(rates[f"p{p}"], rates["p1"], strict=True)]
        out[f"loader_scaling_{p}"] = round(statistics.median(ratios), 3)
        out[f"loader_scaling_{p}_rounds"] = [round(r, 3) for r in ratios]
    for t in (1, 2):
        out[f"loader_{t}_threads_per_s"] = round(statistics.median(rates[f"t{t}"]), 1)
    ratios = [a / b for a, b in zip(rates["t2"], rates["t1"], strict=True)]
    out["loader_threads_2_over_1"] = round(statistics.median(ratios), 3)
    out["loader_scaling_goal"] = 1.6
    out["cpu_ms_per_batch"] = {
        k: {part: round(statistics.median(m[part] for m in v), 2) for part in v[0]}
        for k, v in cpu.items()
    }
    return out


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
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the loader figures")
    ap.add_argument("--skip-inserts", action="store_true", help="no insert figures (faster)")
    args = ap.parse_args()

    pool = pong_frames(8, args.pool_steps, game=args.env)
    res: dict = {"env": args.env, "codec": args.codec, "naive_bytes_per_transition": NAIVE_BYTES}
    res["codecs"] = codec_table(pool)

    with EmbeddedRedis(None, appendonly=False) as server:
        client = redis.Redis.from_url(server.admin_url)  # INFO, FLUSHALL
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
            (shard.index.rec.itemsize + 4 + 16) * 2e6 / 1e9, 2
        )  # records + raw priorities + sum tree (2x leaves, float64), in the shard process
        res["bytes_per_transition_other_codecs_estimated"] = {
            name: round(bpt + (c["bytes_per_frame"] - frame_b) * frames_pushed / size, 1)
            for name, c in res["codecs"].items()
        }
        # ---- sampling ------------------------------------------------------
        sampler = ReplaySampler(
            pair([shard], endpoints([server.url])), args.codec, min_size=1, seed=0
        )
        draws = [shard.sample(args.batch) for _ in range(args.sample_batches)]
        all_ids = np.unique(
            np.concatenate([np.concatenate([d.obs_ids, d.next_obs_ids]).ravel() for d in draws])
        )
        res["distinct_frames_per_batch"] = round(
            float(
                np.mean(
                    [np.unique(np.concatenate([d.obs_ids, d.next_obs_ids])).size for d in draws]
                )
            ),
            1,
        )
        ring = pool[np.arange(all_ids.size) % len(pool)].copy()  # uncompressed frames in RAM
        idx = [
            (np.searchsorted(all_ids, d.obs_ids), np.searchsorted(all_ids, d.next_obs_ids))
            for d in draws
        ]

        def ring_rate() -> float:  # the same batches from a numpy ring of raw frames
            t = time.perf_counter()
            for o, n in idx:
                ring[o], ring[n]  # noqa: B018 (the gather is the work)
            return args.batch * len(idx) / (time.perf_counter() - t)

        meter, sample_cpu = CpuMeter(client), []

        def sample_rate() -> float:  # batches are dropped at once, as a learner does
            meter.start()
            t = time.perf_counter()
            got = sum(len(sampler.sample(args.batch, 0.4)) for _ in range(args.sample_batches))
            rate = got / (time.perf_counter() - t)
            sample_cpu.append(meter.per_batch(args.sample_batches))
            return rate

        sampler.sample(args.batch, 0.4)
        ring_rate()
        pairs = [(sample_rate(), ring_rate()) for _ in range(args.rounds)]
        ours = statistics.median(a for a, _ in pairs)
        res["sample_transitions_per_s"] = round(ours, 1)
        res["sample_baseline_numpy_ring_per_s"] = round(statistics.median(b for _, b in pairs), 1)
        res["sample_ratio"] = round(statistics.median(a / b for a, b in pairs), 3)
        res["sample_ratio_goal"] = 0.33 if args.transitions >= 2_000_000 else 0.25
        res.update(loader_figures(sampler, args, client))
        res["cpu_ms_per_batch"]["sample_in_process"] = {
            part: round(statistics.median(m[part] for m in sample_cpu), 2)
            for part in ("this_process", "redis")
        }
        res["loader_1_ratio"] = round(
            res["loader_1_procs_per_s"] / res["sample_baseline_numpy_ring_per_s"], 3
        )
        shard.stop()
        if args.skip_inserts:
            res["cpus"] = os.cpu_count()
            print(json.dumps(res))
            return
        client.flushall(asynchronous=True)  # 2M keys: a blocking FLUSHALL takes seconds

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
            server.admin_url, args.codec, pool, "raw", args.insert_seconds, args.envs, args.steps
        )
        raw_rate = raw_n / raw_secs
        client.flushall()
        mset_n, mset_secs = run_writers(
            server.admin_url,
            args.codec,
            pool,
            "raw-mset",
            args.insert_seconds,
            args.envs,
            args.steps,
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
