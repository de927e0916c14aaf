"""Insert throughput of two revisions, measured in alternating rounds.

Machines here are noisy: one insert window of `bench/replay.py` can move by
30% between two runs of the same code. This bench checks a change to the insert
path out into two git worktrees and measures them one after the other, round
after round, each round in fresh processes:

* ``push_only_per_s``: transitions/s 2 writer processes push (`ReplayWriter`,
  the push script) with no shard ingesting;
* ``stored_per_s``: transitions/s stored while a `ReplayShard` ingests in the
  measuring process (the backlog counted until drained), as
  ``insert_transitions_per_s`` of `bench/replay.py`;
* ``ingest_only_per_s``: transitions/s a shard ingests from a backlog pushed
  beforehand (the shard side alone).

It prints ONE JSON object: per round the ``after / before`` ratio of each
figure, and their medians (the figure to quote).

    python bench/insert_ab.py --before cfe5233 --after HEAD --rounds 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Runs inside a worktree (argv[1]) with the interpreter of this checkout.
_MEASURE = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1])
import redis
import bench.replay as br
from replay_server.keys import ReplayKeys
from replay_server.redis_proc import EmbeddedRedis
from replay_server.shard import ReplayShard

secs = float(sys.argv[2])
pool = br.pong_frames(8, 200, game="pong")
out = {}
with EmbeddedRedis(None, appendonly=False) as server:
    client = redis.Redis.from_url(server.admin_url)
    incoming = ReplayKeys().incoming
    pushed, s = br.run_writers(server.url, "lz4", pool, "replay", secs, 16, 25)
    out["push_only_per_s"] = pushed / s
    shard = ReplayShard(server.url, capacity=400_000, seed=0)
    t = time.perf_counter()
    while shard.ingest(256) > 0:
        pass
    out["ingest_only_per_s"] = shard.stats().inserted_total / (time.perf_counter() - t)
    shard.stop()
    client.flushall()
    shard = ReplayShard(server.url, capacity=400_000, seed=0)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            if shard.ingest(256) == 0:
                time.sleep(0.002)

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    pushed, s = br.run_writers(server.url, "lz4", pool, "replay", secs, 16, 25)
    t = time.perf_counter()
    while client.llen(incoming) > 0 and time.perf_counter() - t < 60:
        time.sleep(0.02)
    drain = time.perf_counter() - t
    stop.set()
    th.join()
    out["stored_per_s"] = shard.stats().inserted_total / (s + drain)
    shard.stop()
print(json.dumps(out))
"""

FIGURES = ("push_only_per_s", "ingest_only_per_s", "stored_per_s")


def worktree(rev: str, root: str) -> str:
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    path = os.path.join(root, sha[:12])
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", path, sha], check=True
    )
    return path


def measure(tree: str, seconds: float) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _MEASURE, tree, str(seconds)],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), timeout=600,
    )  # fmt: skip
    if res.returncode != 0:
        raise SystemExit(f"measuring {tree} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--before", required=True, help="git revision of the baseline")
    ap.add_argument("--after", default="HEAD", help="git revision to compare (default HEAD)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=3.0, help="push window per figure")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="apex-ab-")
    trees = {"before": worktree(args.before, root), "after": worktree(args.after, root)}
    rounds = []
    try:
        for r in range(args.rounds):
            order = ("before", "after") if r % 2 == 0 else ("after", "before")
            got = {side: measure(trees[side], args.seconds) for side in order}
            rounds.append(got)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{f} {got['after'][f] / got['before'][f]:.2f}x" for f in FIGURES
            ), file=sys.stderr)  # fmt: skip
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", tree])
    out = {"bench": "insert-ab", "before": args.before, "after": args.after}
    out["cpus"] = os.cpu_count()
    for f in FIGURES:
        ratios = [g["after"][f] / g["before"][f] for g in rounds]
        out[f"{f}_ratio_median"] = round(statistics.median(ratios), 3)
        out[f"{f}_ratios"] = [round(x, 3) for x in ratios]
        for side in ("before", "after"):
            out[f"{f}_{side}_median"] = round(statistics.median(g[side][f] for g in rounds), 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
