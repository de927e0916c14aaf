"""Soak: a training run at replay capacity, its Redis restarted every few minutes;
memory must stay flat.

    python bench/soak.py                                  # 30 minutes, a restart every 5
    python bench/soak.py --minutes 10 --restart-every 2.5 --json out.json

Starts a redis-server the run does not own (`EmbeddedRedis`: AOF on, the same
ACL and limits as the embedded one) and `apex-dqn train` against it, with the
small settings of `bench/faults.py` (Pong, 2 actors x 4 envs, no evaluator) and
``--capacity`` transitions: the replay is full within the first minutes and
evicts from then on. Every ``--restart-every`` minutes the redis-server is
killed (kill -9: a crash, the harshest restart) and started again on its AOF.

Memory is sampled every 30 s from the moment the replay is full: Redis's
``used_memory``, and the resident set (RSS) of the driver (`apex-dqn train`,
which holds the learner and the loaders' parent), of the actors
(``ray::ApexActor``) and of the replay shard (``ray::ReplayShard``). It prints
ONE JSON object: each figure at the start (replay full) and at the end, the
ratio end/start, ``flat`` (every ratio within ``--tolerance``, default 10%),
``growth_per_hour`` (each figure's least-squares trend over all samples, as a
fraction of its mean per hour: what tells a leak from sample-to-sample noise),
the samples, the restarts, and the run's own fault counters (outages, what was
lost).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.faults import SMALL, TrainingRun, parse_replay  # noqa: E402
from replay_server.redis_proc import EmbeddedRedis  # noqa: E402

SAMPLE_EVERY_S = 30.0


def _rss(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def sample(run: TrainingRun, server: EmbeddedRedis) -> dict[str, Any]:
    """One memory sample (bytes); Redis's figure is None while it is down."""
    import redis

    used = None
    try:
        client = redis.Redis.from_url(server.admin_url, socket_timeout=5)
        used = int(client.info("memory")["used_memory"])
        client.close()
    except (redis.RedisError, OSError):
        pass
    return {
        "t": round(time.monotonic(), 1),
        "redis_used_memory": used,
        "driver_rss": _rss([psutil.Process(run.proc.pid)]),
        "actors_rss": _rss(run.descendants("ray::ApexActor")),
        "shard_rss": _rss(run.descendants("ray::ReplayShard")),
    }


def growth_per_hour(samples: list[dict[str, Any]], key: str) -> float | None:
    """The least-squares slope of ``key`` over the samples, as a fraction of its
    mean per hour: a leak is a steady slope, while RSS also jumps by a few percent
    from one sample to the next (allocator arenas), which the two end points alone
    cannot tell from growth."""
    pts = [(s["t"], s[key]) for s in samples if s[key] is not None]
    if len(pts) < 3:
        return None
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    var = sum((t - mt) ** 2 for t, _ in pts)
    if var == 0 or mv == 0:
        return None
    slope = sum((t - mt) * (v - mv) for t, v in pts) / var
    return round(slope * 3600 / mv, 4)


def settings(capacity: int, seconds: float) -> list[str]:
    """bench/faults.py's small settings, with this capacity and length."""
    args = list(SMALL)
    i = args.index("--capacity")
    args[i + 1] = str(capacity)
    return [*args, "--max-seconds", str(int(seconds))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0, help="soak length once full")
    ap.add_argument(
        "--restart-every", type=float, default=5.0, help="minutes between Redis restarts"
    )
    ap.add_argument("--capacity", type=int, default=20_000, help="replay capacity")
    ap.add_argument("--tolerance", type=float, default=0.10, help="flat: end/start - 1 within")
    ap.add_argument("--json", default="", help="also write the JSON here")
    args = ap.parse_args()
    if not 1 <= args.minutes <= 24 * 60:
        ap.error(f"--minutes {args.minutes:g}: give 1 to 1440")
    if not 0.5 <= args.restart_every <= args.minutes:
        ap.error(f"--restart-every {args.restart_every:g}: give 0.5 to --minutes")

    tmp = Path(tempfile.mkdtemp(prefix="apex-soak-"))
    server = EmbeddedRedis(str(tmp / "redis"))
    # the run's own limit: filling up (a few minutes at most) plus the soak
    run = TrainingRun(
        settings(args.capacity, 600 + 60 * args.minutes + 60),
        tmp / "run",
        env={"APEX_REDIS_URL": server.url},
    )
    samples: list[dict[str, Any]] = []
    restarts: list[float] = []
    try:
        run.wait_for(
            lambda: any(
                (n := parse_replay(line)) is not None and n >= 0.98 * args.capacity
                for _, line in run.lines[-5:]
            ),
            600,
            f"the replay to fill ({args.capacity:,} transitions)",
        )
        t0 = time.monotonic()
        end = t0 + 60 * args.minutes
        next_restart = t0 + 60 * args.restart_every
        next_sample = t0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(sample(run, server))
                next_sample += SAMPLE_EVERY_S
            if now >= next_restart and now < end - 30:
                server.kill()
                server.restart()
                restarts.append(round(now - t0, 1))
                next_restart += 60 * args.restart_every
            if run.proc.poll() is not None:
                raise AssertionError(f"the run ended during the soak:\n{run.tail()}")
            time.sleep(1.0)
        samples.append(sample(run, server))
        run.stop()  # SIGTERM: the final checkpoint and summary
        code, summary = run.proc.returncode, {}
        if run.summary_path.exists():
            summary = json.loads(run.summary_path.read_text())
    finally:
        run.stop()
        server.stop()

    first = next(s for s in samples if s["redis_used_memory"] is not None)
    last = next(s for s in reversed(samples) if s["redis_used_memory"] is not None)
    keys = ("redis_used_memory", "driver_rss", "actors_rss", "shard_rss")
    ratios = {k: round(last[k] / first[k], 3) for k in keys if first[k]}
    out = {
        "bench": "soak",
        "minutes": args.minutes,
        "restart_every_minutes": args.restart_every,
        "capacity": args.capacity,
        "cpus": psutil.cpu_count(),
        "start": {k: first[k] for k in keys},
        "end": {k: last[k] for k in keys},
        "end_over_start": ratios,
        "growth_per_hour": {k: growth_per_hour(samples, k) for k in keys},
        "flat": all(abs(r - 1.0) <= args.tolerance for r in ratios.values()),
        "tolerance": args.tolerance,
        "redis_restarts_at_s": restarts,
        "exit_code": code,
        "run": {
            k: summary.get(k)
            for k in (
                "updates",
                "frames",
                "replay_size",
                "replay_outages",
                "replay_outage_s",
                "transitions_lost",
                "transitions_lost_by_redis",
                "transitions_dropped_by_actors",
                "replay_resets",
            )
        },
        "samples": [{**s, "t": round(s["t"] - samples[0]["t"], 1)} for s in samples],
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
