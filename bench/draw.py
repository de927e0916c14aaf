"""Where a batch's rows are drawn: what the driver pays to draw them over Ray.

Today the driver draws every batch's rows (`ReplaySampler.draw`: a Ray call to
each shard actor, `replay_server.remote.RemoteShard.sample`) and hands their
frame ids to a loader process, which fetches and decodes the frames. The
alternative, loader processes drawing rows themselves, can save at most what
the driver spends on those calls. This bench measures it: one shard filled with
``--transitions`` real Pong transitions, then ``sample(B)`` timed

* through the shard's Ray actor (``RemoteShard``), the driver's wall and CPU
  milliseconds per call (what the driver pays now);
* on the same index in this process (a ``ReplayShard`` object): the draw itself,
  with no RPC (what a loader drawing from a local index would pay at least).

Prints ONE JSON object, both per batch size, and the Ray call's driver CPU as a
fraction of ``--batch-cpu-ms`` (the CPU a whole batch costs, from
``bench/replay.py``'s ``cpu_ms_per_batch``; default: its 2M-stored figure for
512, loader + Redis + driver, 18.4 ms).

    python bench/draw.py                          # 100K stored, batches of 32 and 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, n: int) -> dict:
    """Wall and this process's CPU milliseconds per call, over ``n`` calls."""
    fn()  # warm
    w0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n):
        fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"wall_ms": round(1000 * wall / n, 3), "driver_cpu_ms": round(1000 * cpu / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transitions", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=300, help="timed calls per figure")
    ap.add_argument("--batch-cpu-ms", type=float, default=18.4)
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()

    import ray

    from bench.learner import fill_replay
    from replay_server.redis_proc import EmbeddedRedis
    from replay_server.remote import RemoteShard
    from replay_server.shard import ReplayShard

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out: dict = {"benchmark": "draw", "transitions": args.transitions, "calls": args.calls}
    with EmbeddedRedis(None, appendonly=False) as server:
        local, fill_s = fill_replay(server.url, args.transitions, "lz4", seed=0)
        local.snapshot()
        out["fill_s"] = round(fill_s, 1)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
        try:
            cls = ray.remote(num_cpus=0, max_concurrency=8)(ReplayShard)
            handle = cls.remote(server.url, args.transitions, seed=1)  # loads the same index
            remote = RemoteShard(handle)
            assert remote.stats().size == local.size
            for b in (32, 512):
                over_ray = timed(lambda b=b: remote.sample(b), args.calls)
                in_proc = timed(lambda b=b: local.sample(b), args.calls)
                out[f"batch_{b}"] = {
                    "over_ray": over_ray,
                    "in_process": in_proc,
                    "ray_over_in_process_wall": round(
                        over_ray["wall_ms"] / max(in_proc["wall_ms"], 1e-9), 2
                    ),
                }
            out["driver_cpu_fraction_of_a_512_batch"] = round(
                out["batch_512"]["over_ray"]["driver_cpu_ms"] / args.batch_cpu_ms, 3
            )
        finally:
            ray.shutdown()
    out["machine"] = {"cpus": os.cpu_count()}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
