"""What ``apex-dqn train --in-process`` costs or gains against the Ray run.

Runs the same step-bound job twice, one after the other, on this machine:
``apex-dqn train --max-updates N`` (Pong at the hardware profile's settings,
evaluation off) on local Ray, then with ``--in-process``. Prints ONE JSON
object with, for each: the whole command's wall seconds (start-up included),
the seconds until the first progress line (start-up: Ray, Redis, actors), the
run's frames/s and updates/s from its summary; and the ratios in-process / Ray
(measured in the same run: the machine's noise is shared).

    python bench/in_process.py                        # 1,000 updates each
    python bench/in_process.py --updates 300 --env ApexCatch-v0 -- --min-replay 1000

Flags after ``--`` go to both runs unchanged. Take the machine for yourself
while it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(mode: str, args: argparse.Namespace, extra: list[str], tmp: Path) -> dict:
    logdir = tmp / mode
    cmd = [
        sys.executable,
        "-m",
        "deploy.cli",
        "train",
        *("--env", args.env, "--max-updates", str(args.updates)),
        *("--eval-every-minutes", "0", "--log-every", "2"),
        *("--logdir", str(logdir), "--summary-json", str(logdir / "summary.json")),
        *(["--in-process"] if mode == "in_process" else []),
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    t0 = time.monotonic()
    first = None
    with subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if first is None and "frames/s" in line:
                first = time.monotonic() - t0
        code = proc.wait()
    wall = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"{mode}: apex-dqn train exited with {code}: {' '.join(cmd)}")
    s = json.loads((logdir / "summary.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "first_progress_s": None if first is None else round(first, 1),
        "updates": s["updates"],
        "frames": s["frames"],
        "frames_per_s": round(s["frames_per_s"], 1),
        "updates_per_s": round(s["updates_per_s"], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--updates", type=int, default=1000, help="learner updates per run")
    p.add_argument("--env", default="ALE/Pong-v5")
    p.add_argument("--json", help="also write the JSON here")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory(prefix="bench-in-process-") as tmp:
        ray = run("ray", args, extra, Path(tmp))
        local = run("in_process", args, extra, Path(tmp))
    out = {
        "benchmark": "in_process",
        "env": args.env,
        "updates": args.updates,
        "extra_flags": extra,
        "ray": ray,
        "in_process": local,
        "ratio_in_process_over_ray": {
            k: round(local[k] / ray[k], 3)
            for k in ("wall_s", "first_progress_s", "frames_per_s", "updates_per_s")
            if local[k] and ray[k]
        },
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
