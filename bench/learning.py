"""Time-to-score: the product's headline benchmark.

Runs ``apex-dqn train`` as the README's first command does (``bash deploy/train.sh``
with no flags: the hardware profile picks the settings) for a wall-clock budget
on this machine, with greedy evaluations during the run (the published no-op
protocol: up to 30 no-op starts, no sticky actions, epsilon 0.001, 10 episodes;
every ``--eval-every-minutes`` of the profile) and one of the final weights at
the end. Prints ONE JSON object:

* ``curve``: one point per evaluation: minutes of training (from the loop's start;
  ``wall_minutes`` is the whole command, start-up included) when its weights were
  taken, env frames, learner updates, mean and standard error of the raw scores;
* ``final``: the last evaluation (the final weights): mean, standard error, scores;
* ``settings``: what the run chose (its ``config.json``: profile, network, batch,
  target period, replay ratio, ...) and the machine (cores, CPU, torch);
* ``summary``: the run's own summary (frames/s, updates/s, ...).

    python bench/learning.py --minutes 60                      # the README's figure
    python bench/learning.py --minutes 30 -- --network nature  # an A/B arm: flags after --
    python bench/learning.py --minutes 30 --env breakout --json out.json

Flags after ``--`` go to ``apex-dqn train`` unchanged (A/B runs). The run's
logdir (``--logdir``, default ``runs/bench-learning-<time>``) keeps its
TensorBoard logs for ``apex-dqn plot``. Take the machine for yourself while it
runs: a second run at the same time halves both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stderr_of_mean(scores: list[float]) -> float | None:
    """Standard error of the mean of ``scores`` (sample std / sqrt(n)); None for n < 2."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    var = sum((s - mean) ** 2 for s in scores) / (n - 1)
    return math.sqrt(var / n)


def curve_point(record: dict) -> dict:
    """One evaluation record of ``evals.jsonl`` as a point of the curve."""
    scores = [float(s) for s in record["scores"]]
    return {
        "minutes": round(float(record["elapsed_s"]) / 60.0, 2),
        "env_frames": int(record["env_frames"]),
        "updates": int(record["updates"]),
        "weight_version": int(record["weight_version"]),
        "mean": round(float(record["eval_return_mean"]), 2),
        "stderr": None if (se := stderr_of_mean(scores)) is None else round(se, 2),
        "episodes": len(scores),
        "eval_seconds": round(float(record.get("eval_seconds", 0.0)), 1),
    }


def read_curve(logdir: Path) -> list[dict]:
    path = logdir / "evals.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        try:
            points.append(curve_point(json.loads(line)))
        except (ValueError, KeyError, TypeError):
            continue
    return points


def settings_of(config: dict) -> dict:
    """The settings that decide learning speed, from a run's config.json."""
    pick = {
        "run": ("profile",),
        "learner": (
            "network",
            "batch_size",
            "lr",
            "target_update",
            "double",
            "dueling",
            "torch_threads",
            "learner_dtype",
        ),
        "replay": ("samples_per_insert", "min_replay", "beta_anneal_updates", "loader_workers"),
        "actor": ("actors", "envs_per_actor", "n_step"),
        "eval": ("eval_every_minutes", "eval_episodes"),
        "env": ("env",),
    }
    return {k: config.get(s, {}).get(k) for s, keys in pick.items() for k in keys}


def machine() -> dict:
    cpu = platform.processor()
    try:
        info = Path("/proc/cpuinfo").read_text()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln)
    except (OSError, StopIteration):
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(
        description="Time-to-score: train for a wall-clock budget as the README's first "
        "command does; print the greedy evaluation curve as JSON.",
        epilog="Flags after -- go to 'apex-dqn train' (e.g. -- --network nature).",
    )
    ap.add_argument("--minutes", type=float, default=60.0, help="training budget (default 60)")
    ap.add_argument("--env", default="", help="game (default: the train command's, Pong)")
    ap.add_argument(
        "--logdir", default="", help="run directory (default runs/bench-learning-<time>)"
    )
    ap.add_argument("--json", default="", help="also write the JSON here")
    ap.add_argument(
        "--eval-every-minutes",
        type=float,
        default=0.0,
        help="evaluation cadence (default: the profile's)",
    )
    ap.add_argument("--seed", type=int, default=0, help="the run's --seed (default 0)")
    args, extra = ap.parse_known_args()
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not args.minutes > 0:
        ap.error("--minutes must be > 0")
    logdir = Path(args.logdir or f"runs/bench-learning-{time.strftime('%Y%m%d-%H%M%S')}")
    if (logdir / "evals.jsonl").exists():
        ap.error(f"{logdir} already holds a run; give a new --logdir")
    summary_path = logdir / "summary.json"
    cmd = [
        "bash",
        str(REPO / "deploy" / "train.sh"),
        "--max-seconds",
        f"{60 * args.minutes:g}",
        "--logdir",
        str(logdir),
        "--summary-json",
        str(summary_path),
        "--seed",
        str(args.seed),
    ]
    if args.env:
        cmd += ["--env", args.env]
    if args.eval_every_minutes:
        cmd += ["--eval-every-minutes", f"{args.eval_every_minutes:g}"]
    cmd += extra
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    # the run's progress lines go to stderr: stdout carries the one JSON object
    rc = subprocess.call(cmd, stdout=sys.stderr, cwd=REPO)
    wall = time.monotonic() - t0
    curve = read_curve(REPO / logdir if not logdir.is_absolute() else logdir)
    base = REPO / logdir if not logdir.is_absolute() else logdir
    config = (
        json.loads((base / "config.json").read_text()) if (base / "config.json").is_file() else {}
    )
    summary = (
        json.loads((base / "summary.json").read_text()) if (base / "summary.json").is_file() else {}
    )
    final = curve[-1] if curve else None
    out = {
        "benchmark": "time-to-score",
        "command": " ".join(cmd),
        "exit_code": rc,
        "budget_minutes": args.minutes,
        "wall_minutes": round(wall / 60.0, 2),
        "logdir": str(logdir),
        "final": final,
        "curve": curve,
        "settings": settings_of(config),
        "machine": machine(),
        "summary": {
            k: summary.get(k)
            for k in (
                "frames",
                "updates",
                "frames_per_s",
                "updates_per_s",
                "data_wait_fraction",
                "mean_return",
                "best_eval_return_mean",
                "evaluations",
                "stop_reason",
            )
        },
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if rc != 0:
        print(f"[bench] apex-dqn train exited {rc}", file=sys.stderr)
    return 0 if rc == 0 and final is not None else 1


if __name__ == "__main__":
    sys.exit(main())
