"""Ape-X per-env epsilons and the decaying schedules."""

from __future__ import annotations

import numpy as np
import pytest

from actors.exploration import Exploration, apex_epsilons, decayed_epsilon, single_env_warning
from common.config import ActorConfig
from common.exploration import epsilon_greedy


def test_apex_epsilons_span_the_run():
    cfg = ActorConfig(envs_per_actor=4, eps_base=0.4, eps_alpha=7.0)
    # 2 actors x 4 envs: N = 8, eps_i = 0.4 ** (1 + 7 * i / 7) = 0.4 ** (1 + i)
    a0 = Exploration(cfg, actor_index=0, num_actors=2).epsilons()
    a1 = Exploration(cfg, actor_index=1, num_actors=2).epsilons(frames=10**9)
    assert a0 == pytest.approx([0.4, 0.16, 0.064, 0.0256])
    assert a1 == pytest.approx([0.4**5, 0.4**6, 0.4**7, 0.4**8])
    assert apex_epsilons(0.4, 7.0, 1, np.array([0])).tolist() == [0.4]
    one = Exploration(ActorConfig(envs_per_actor=1), actor_index=0, num_actors=1)
    assert one.epsilons().tolist() == [0.4]


@pytest.mark.parametrize(
    "kind,frames,expected",
    [
        ("linear", 0, 1.0),
        ("linear", 500, 0.505),
        ("linear", 1000, 0.01),
        ("linear", 5000, 0.01),
        ("exp", 0, 1.0),
        ("exp", 500, 0.1),  # geometric mean of 1 and 0.01
        ("exp", 250, 0.01**0.25),
        ("exp", 1000, 0.01),
        ("exp", 10**6, 0.01),
    ],
)
def test_decaying_schedules(kind, frames, expected):
    assert decayed_epsilon(kind, 1.0, 0.01, 1000, frames) == pytest.approx(expected)
    cfg = ActorConfig(
        envs_per_actor=3, exploration=kind, eps_start=1.0, eps_end=0.01, eps_decay_frames=1000
    )
    assert Exploration(cfg, 0, 5).epsilons(frames) == pytest.approx([expected] * 3)


def test_exp_schedule_to_zero_falls_back_to_linear():
    assert decayed_epsilon("exp", 1.0, 0.0, 100, 50) == pytest.approx(0.5)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="apex, exp or linear"):
        Exploration(ActorConfig(exploration="cosine"), 0, 1)


def test_epsilon_greedy():
    rng = np.random.default_rng(0)
    q = np.tile(np.array([[0.0, 3.0, 1.0]], np.float32), (2, 1))
    counts = np.zeros((2, 3))
    for _ in range(3000):
        a = epsilon_greedy(q, np.array([0.0, 1.0]), rng)
        assert a.dtype == np.int64
        counts[np.arange(2), a] += 1
    assert counts[0].tolist() == [0, 3000, 0]  # greedy env
    assert (np.abs(counts[1] - 1000) < 150).all()  # uniformly random env


def test_one_env_in_the_run_is_warned_about():
    one = ActorConfig(envs_per_actor=1)
    assert "epsilon 0.4 for every step" in single_env_warning(one, num_actors=1)
    assert single_env_warning(one, num_actors=2) is None  # N = 2: 0.4 and 0.4**8
    assert single_env_warning(ActorConfig(envs_per_actor=2), num_actors=1) is None
    decaying = ActorConfig(envs_per_actor=1, exploration="linear")
    assert single_env_warning(decaying, num_actors=1) is None
