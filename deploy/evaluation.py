"""Ray wiring of evaluation during training: the named actor ``apex-eval``.

  apex-eval   `learner.evaluator.Evaluator`, num_cpus=1, anywhere with a free CPU
              (it plays whole episodes: keep it off the learner's cores), at nice
              ``EVAL_NICE`` (where cores are short, the learner and actors go first),
              max_restarts=-1 and no task retries (a crash fails that one
              evaluation, logged and counted; the next starts when due)

`RayEvalBackend` is the `learner.evaluator.EvalBackend` the launcher hands to
`PeriodicEvaluation`: ``submit`` puts the weights in the object store once and
calls ``evaluate`` without waiting; ``poll`` is a zero-timeout ``ray.wait``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np
import ray

from common.config import Config
from learner.evaluator import EvalFailed, EvalRequest, Evaluator

EVAL_NAME = "apex-eval"
# apex-eval's nice value (CFS weight 335 vs 1024): on a machine whose cores the
# learner and the actors keep busy (2 cores) an evaluation takes about a quarter of
# a core instead of a third of each, and with idle cores it runs at full speed.
EVAL_NICE = 5


class RayEvalBackend:
    """Runs evaluations on the ``apex-eval`` actor; at most one in flight."""

    def __init__(self, cfg: Config, num_actions: int):
        cls = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=0)(Evaluator)
        self.handle = cls.options(name=EVAL_NAME).remote(
            cfg, num_actions, torch_threads=1, nice=EVAL_NICE
        )
        self._ref: Any = None

    def submit(self, request: EvalRequest, weights: dict[str, np.ndarray]) -> None:
        self._ref = self.handle.evaluate.remote(asdict(request), ray.put(weights))

    def poll(self) -> dict[str, Any] | None:
        if self._ref is None:
            return None
        ready, _ = ray.wait([self._ref], timeout=0)
        if not ready:
            return None
        ref, self._ref = self._ref, None
        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise EvalFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None

    def close(self) -> None:
        self._ref = None
        try:
            ray.kill(self.handle, no_restart=True)
        except ray.exceptions.RayError:
            pass
