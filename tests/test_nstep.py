"""n-step returns, discounts, bootstrap targets and priorities on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from common.nstep import NStepAccumulator, initial_priorities
from common.types import PRIORITY_FLOOR

G = 0.5  # powers of 0.5 are exact in float32: expected values are hand-computed

# (name, n, steps [(reward, terminated, truncated)], expected emissions
#  [(step emitted at, s id, return, discount, s' id)]). Step t goes s_t -> s_{t+1};
#  ids stand for whole stacks (the stack of s_t is [t, t, t, t]).
CASES = [
    (
        "running episode emits full n-step windows",
        3,
        [(1, 0, 0), (2, 0, 0), (3, 0, 0), (4, 0, 0)],
        [(2, 0, 1 + G * 2 + G**2 * 3, G**3, 3), (3, 1, 2 + G * 3 + G**2 * 4, G**3, 4)],
    ),
    (
        "terminal: no bootstrap, partial windows flushed",
        3,
        [(1, 0, 0), (2, 1, 0)],
        [(1, 0, 1 + G * 2, 0.0, 2), (1, 1, 2.0, 0.0, 2)],
    ),
    (
        "truncation: bootstrap with gamma^k from the final stack",
        3,
        [(1, 0, 0), (2, 0, 1)],
        [(1, 0, 1 + G * 2, G**2, 2), (1, 1, 2.0, G, 2)],
    ),
    (
        "terminal after a full window: the last n records all end at the terminal",
        3,
        [(1, 0, 0), (0, 0, 0), (0, 0, 0), (1, 1, 0)],
        [
            (2, 0, 1.0, G**3, 3),
            (3, 1, G**2 * 1, 0.0, 4),
            (3, 2, G * 1, 0.0, 4),
            (3, 3, 1.0, 0.0, 4),
        ],
    ),
    (
        "truncation after a full window",
        2,
        [(1, 0, 0), (-1, 0, 0), (1, 0, 1)],
        [(1, 0, 1 - G, G**2, 2), (2, 1, -1 + G, G**2, 3), (2, 2, 1.0, G, 3)],
    ),
    (
        "terminated and truncated together count as terminal",
        2,
        [(1, 1, 1)],
        [(0, 0, 1.0, 0.0, 1)],
    ),
    (
        "n = 1 is one-step Q-learning",
        1,
        [(1, 0, 0), (-1, 0, 0), (1, 1, 0)],
        [(0, 0, 1.0, G, 1), (1, 1, -1.0, G, 2), (2, 2, 1.0, 0.0, 3)],
    ),
]


def stack(i: int) -> np.ndarray:
    return np.full((1, 4), i, np.int64)


@pytest.mark.parametrize("name,n,steps,expected", CASES, ids=[c[0] for c in CASES])
def test_nstep_cases(name, n, steps, expected):
    acc = NStepAccumulator(num_envs=1, n=n, gamma=G)
    got = []
    for t, (r, term, trunc) in enumerate(steps):
        out = acc.add(
            obs_ids=stack(t),
            actions=np.array([t % 3]),
            rewards=np.array([r], np.float32),
            q_taken=np.array([10.0 * t], np.float32),
            next_obs_ids=stack(t + 1),
            terminated=np.array([bool(term)]),
            truncated=np.array([bool(trunc)]),
        )
        assert out.returns.dtype == np.float32 and out.discounts.dtype == np.float32
        for j in range(len(out)):
            assert (out.obs_ids[j] == out.obs_ids[j, 0]).all()
            assert out.actions[j] == out.obs_ids[j, 0] % 3  # the action taken at s
            assert out.q_taken[j] == 10.0 * out.obs_ids[j, 0]
            got.append(
                (t, int(out.obs_ids[j, 0]), float(out.returns[j]), float(out.discounts[j]),
                 int(out.next_obs_ids[j, 0]))
            )  # fmt: skip
    assert sorted(got) == sorted((a, b, float(c), float(d), e) for a, b, c, d, e in expected)
    assert acc.held_ids().size == 4 * (len(steps) - len(expected))


def test_envs_are_independent_and_reset_rows_are_skipped():
    acc = NStepAccumulator(num_envs=3, n=2, gamma=G)
    ids = np.arange(3)[:, None].repeat(4, 1)
    # env 0 terminates, env 1 is in its NEXT_STEP reset step (inactive), env 2 runs on.
    out = acc.add(
        ids, np.array([0, 1, 2]), np.array([1.0, 5.0, 2.0]), np.zeros(3, np.float32),
        ids + 10, np.array([True, False, False]), np.array([False, True, False]),
        active=np.array([True, False, True]),
    )  # fmt: skip
    assert out.env.tolist() == [0] and out.returns.tolist() == [1.0]
    assert out.discounts.tolist() == [0.0] and out.next_obs_ids[0].tolist() == [10] * 4
    out = acc.add(
        ids + 10, np.array([0, 1, 2]), np.array([0.0, 1.0, 4.0]), np.zeros(3, np.float32),
        ids + 20, np.zeros(3, bool), np.zeros(3, bool),
    )  # fmt: skip
    # only env 2 has a full window; envs 0 and 1 each hold one record now
    assert out.env.tolist() == [2]
    assert out.returns.tolist() == [2.0 + G * 4.0] and out.discounts.tolist() == [G**2]
    assert out.obs_ids[0].tolist() == [2] * 4 and out.next_obs_ids[0].tolist() == [22] * 4
    assert sorted(acc.held_ids().tolist()) == [10] * 4 + [11] * 4 + [12] * 4


def test_priorities_use_the_next_steps_q_values():
    acc = NStepAccumulator(num_envs=2, n=1, gamma=G)
    ids = np.zeros((2, 4), np.int64)
    out = acc.add(
        ids, np.array([0, 1]), np.array([1.0, 1.0]), np.array([3.0, 1.0], np.float32),
        ids + 1, np.array([False, True]), np.zeros(2, bool),
    )  # fmt: skip
    q_next = np.array([[2.0, 6.0, -1.0], [100.0, 0.0, 0.0]], np.float32)
    batch = out.complete(q_next)
    batch.validate()
    # env 0: |1 + 0.5 * max(2, 6, -1) - 3| = 1; env 1 terminal: |1 + 0 - 1| = 0 -> floor
    assert batch.priorities.tolist() == pytest.approx([1.0, PRIORITY_FLOOR])
    assert PRIORITY_FLOOR > 0


def test_initial_priorities_formula():
    p = initial_priorities(
        np.array([2.75, -1.0], np.float32), np.array([0.125, 0.0], np.float32),
        np.array([1.0, 0.5], np.float32), np.array([4.0, 9.0], np.float32),
    )  # fmt: skip
    assert p.dtype == np.float32
    assert p.tolist() == pytest.approx([2.25, 1.5])
