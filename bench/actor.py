"""Actor throughput against raw env stepping, on one core, in one run.

Prints ONE JSON object. ``actor_ratio`` = env steps/s of one `ApexActor` (E envs,
batched inference, n-step, lz4 frames and pushes to a real embedded Redis) divided
by env steps/s of a bare ``AtariVectorEnv`` with the same E, preprocessing and one
thread, stepped with random actions on the same pinned core (the baseline is
measured before and after the actor and averaged). Goal: >= 0.5.

    python bench/actor.py --envs 16 --seconds 10 --game pong
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.actor import ApexActor  # noqa: E402
from common.config import Config  # noqa: E402
from common.env import make_vector_env  # noqa: E402
from replay_server.redis_proc import EmbeddedRedis  # noqa: E402


def raw_env_steps_per_s(cfg: Config, envs: int, seconds: float) -> float:
    """Bare vector-env stepping with random actions (FrameEnv = AtariVectorEnv, 1 thread)."""
    env = make_vector_env(cfg.env, envs, seed=123)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(20):  # warm up
        env.step(rng.integers(0, env.num_actions, envs))
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        env.step(rng.integers(0, env.num_actions, envs))
        steps += 1
    rate = steps * envs / (time.perf_counter() - t0)
    env.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--envs", type=int, default=16, help="envs per actor (E)")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--game", default="pong")
    p.add_argument("--codec", default="lz4")
    p.add_argument("--dtype", default="auto", help="actor inference dtype: auto|float32|bfloat16")
    p.add_argument("--cpu", type=int, default=0, help="core to pin this process to")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})

    cfg = Config()
    cfg.env.env = args.game
    cfg.actor.actors = 1
    cfg.actor.envs_per_actor = args.envs
    cfg.replay.codec = args.codec

    base_before = raw_env_steps_per_s(cfg, args.envs, args.seconds / 2)
    with EmbeddedRedis(None, appendonly=False) as srv:
        actor = ApexActor(cfg, 0, srv.url, None, num_actors=1, inference_dtype=args.dtype)
        actor.run(max_steps=30)  # warm up (reset, first pushes)
        s0 = actor.stats()
        t0 = time.perf_counter()
        s1 = actor.run(stop_after_seconds=args.seconds)
        wall = time.perf_counter() - t0
        actor.close()
    base_after = raw_env_steps_per_s(cfg, args.envs, args.seconds / 2)
    baseline = (base_before + base_after) / 2
    steps = s1.env_steps - s0.env_steps
    actor_rate = steps / wall
    times = {k: s1.time[k] - s0.time[k] for k in s1.time}
    print(
        json.dumps(
            {
                "bench": "actor",
                "game": args.game,
                "envs": args.envs,
                "codec": args.codec,
                "inference_dtype": s1.inference_dtype,
                "actor_ratio": round(actor_rate / baseline, 3),
                "goal": 0.5,
                "actor_env_steps_per_s": round(actor_rate, 1),
                "baseline_env_steps_per_s": round(baseline, 1),
                "baseline_before_after": [round(base_before, 1), round(base_after, 1)],
                "transitions_pushed": s1.transitions_pushed - s0.transitions_pushed,
                "pushes_failed": s1.pushes_failed,
                "breakdown": {k: round(v / wall, 3) for k, v in times.items()},
                "seconds": round(wall, 2),
                "cores": 1,
            }
        )
    )


if __name__ == "__main__":
    main()
