"""What evaluation during training costs the learner, against one learner update.

`PeriodicEvaluation.step` runs in the training loop's thread. When an evaluation
starts it takes the newest weights and a CPU copy of the learner's state (for
best.pt), and `deploy.evaluation.RayEvalBackend` puts the weights in Ray's object
store; the episodes themselves run on ``apex-eval``. This prints, as JSON, the
median of each start cost and of one learner update (the baseline, same process,
same run), and how many updates' worth one evaluation start is.

    python bench/evaluation.py [--env PongNoFrameskip-v4] [--batch 64] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

# the repository before bench/ (whose learner.py would shadow the learner package)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="PongNoFrameskip-v4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    import ray

    from common.config import Config
    from common.env import make_vector_env
    from common.types import SampleBatch
    from learner.evaluator import _cpu_copy
    from learner.learner import Learner

    cfg = Config()
    cfg.env.env = args.env
    cfg.learner.device = "cpu"
    probe = make_vector_env(cfg.env, 1)
    num_actions = probe.num_actions
    probe.close()
    learner = Learner(cfg, num_actions, "cpu")
    rng = np.random.default_rng(0)
    b = args.batch
    batch = SampleBatch(
        obs=rng.integers(0, 255, (b, 4, 84, 84), dtype=np.uint8),
        next_obs=rng.integers(0, 255, (b, 4, 84, 84), dtype=np.uint8),
        actions=rng.integers(0, num_actions, b).astype(np.int64),
        returns=rng.standard_normal(b).astype(np.float32),
        discounts=np.full(b, 0.99**3, np.float32),
        weights=np.ones(b, np.float32),
        keys=np.arange(b, dtype=np.int64),
    )
    learner.step(batch)  # warm-up
    update_s = median_s(lambda: learner.step(batch), args.repeats)
    snapshot_s = median_s(
        lambda: (learner.get_weights(), _cpu_copy(learner.state_dict())), args.repeats
    )
    weights = learner.get_weights()
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        put_s = median_s(lambda: ray.put(weights), args.repeats)
    finally:
        ray.shutdown()
    start_s = snapshot_s + put_s
    print(
        json.dumps(
            {
                "bench": "evaluation start cost in the learner's thread",
                "env": args.env,
                "batch": b,
                "learner_dtype": learner.dtype,
                "weights_mb": round(sum(v.nbytes for v in weights.values()) / 1e6, 1),
                "snapshot_ms": round(1e3 * snapshot_s, 1),
                "ray_put_ms": round(1e3 * put_s, 1),
                "evaluation_start_ms": round(1e3 * start_s, 1),
                "baseline_update_ms": round(1e3 * update_s, 1),
                "ratio_start_to_update": round(start_s / update_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
