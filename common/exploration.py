"""Epsilon-greedy action selection: the one copy, used by the actors and evaluation.

The rates themselves are the caller's: per-env Ape-X rates or a decaying schedule
in the actors (`actors.exploration`), the protocol's small epsilon in evaluation
(`common.evaluation`).
"""

from __future__ import annotations

import numpy as np


def epsilon_greedy(q: np.ndarray, eps: np.ndarray | float, rng: np.random.Generator) -> np.ndarray:
    """Actions int64[E] from Q-values float32[E, A] and rates float64[E] (or one float).

    Each env acts uniformly at random with probability ``eps[i]``, else greedily.
    The argmax runs on the float32 Q-values (`common.network` computes the output
    layers in float32 even under bf16), so small action gaps are not rounded away;
    ties go to the lowest index.
    """
    num_envs, num_actions = q.shape
    greedy = q.argmax(axis=1)
    explore = rng.random(num_envs) < eps
    random_actions = rng.integers(0, num_actions, size=num_envs)
    return np.where(explore, random_actions, greedy).astype(np.int64)
