"""Exploration rates: Ape-X fixed per-env epsilons, or one decaying schedule.

Ape-X (Horgan et al. 2018) gives env ``i`` of the ``N`` envs in the whole run a
fixed rate ``eps_i = eps_base ** (1 + eps_alpha * i / (N - 1))`` (``N = 1``:
``eps_base``). Env ``j`` of actor ``a`` with ``E`` envs per actor has the global
index ``i = a * E + j``, so a restarted actor keeps its rates.

The decaying schedules (``exp``, ``linear``) give every env the same rate, going
from ``eps_start`` to ``eps_end`` over ``eps_decay_frames`` emulator frames of this
actor index (the rate is a function of frames, not of learner progress). A
restarted actor, or a resumed run, goes on from where the index was:
``ApexActor.run(schedule_frames=...)``, which `deploy.fleet.ActorFleet` passes.

With one env in the whole run (``N = 1``) every step explores at ``eps_base``
(0.4): nothing acts greedily-most; `single_env_warning` says so at start.
Acting on the rates is `common.exploration.epsilon_greedy`.
"""

from __future__ import annotations

import numpy as np

from common.config import ActorConfig


def apex_epsilons(
    eps_base: float, eps_alpha: float, num_total: int, indices: np.ndarray
) -> np.ndarray:
    """Ape-X rates for global env ``indices`` (int[k]) out of ``num_total`` -> float64[k]."""
    indices = np.asarray(indices, dtype=np.float64)
    if num_total <= 1:
        return np.full(indices.shape, eps_base, dtype=np.float64)
    return eps_base ** (1.0 + eps_alpha * indices / (num_total - 1))


def decayed_epsilon(kind: str, start: float, end: float, decay_frames: int, frames: int) -> float:
    """Rate after ``frames`` emulator frames; ``end`` once ``frames >= decay_frames``.

    linear: straight line from start to end.
    exp:    geometric interpolation ``start * (end/start) ** (frames/decay_frames)``
            (falls back to linear when ``end`` is 0, which has no logarithm).
    """
    frac = min(max(frames, 0) / decay_frames, 1.0)
    if kind == "linear" or end <= 0.0 or start <= 0.0:
        return start + (end - start) * frac
    if kind == "exp":
        return float(start * (end / start) ** frac)
    raise ValueError(f"unknown epsilon schedule {kind!r}; choose apex, exp or linear")


def single_env_warning(cfg: ActorConfig, num_actors: int) -> str | None:
    """A warning when the Ape-X rates give every env ``eps_base`` (one env in the run)."""
    if cfg.exploration != "apex" or num_actors * cfg.envs_per_actor > 1:
        return None
    return (
        f"one env in the whole run: Ape-X exploration gives it epsilon {cfg.eps_base} "
        "for every step (the spread 0.4 ** (1 + 7 i / (N - 1)) needs N > 1 envs); "
        "use more --envs-per-actor, or --exploration linear|exp for one decaying rate"
    )


class Exploration:
    """Per-env epsilons of one actor: ``epsilons(frames) -> float64[E]``.

    ``frames`` is the actor's emulator-frame count (4 per env step); only the
    decaying schedules use it.
    """

    def __init__(self, cfg: ActorConfig, actor_index: int, num_actors: int):
        if cfg.exploration not in ("apex", "exp", "linear"):
            raise ValueError(f"exploration={cfg.exploration!r}; choose apex, exp or linear")
        self.cfg = cfg
        self.num_envs = cfg.envs_per_actor
        first = actor_index * self.num_envs
        self.global_indices = np.arange(first, first + self.num_envs)
        self._fixed = apex_epsilons(
            cfg.eps_base, cfg.eps_alpha, num_actors * self.num_envs, self.global_indices
        )

    def epsilons(self, frames: int = 0) -> np.ndarray:
        if self.cfg.exploration == "apex":
            return self._fixed
        c = self.cfg
        eps = decayed_epsilon(c.exploration, c.eps_start, c.eps_end, c.eps_decay_frames, frames)
        return np.full(self.num_envs, eps, dtype=np.float64)
