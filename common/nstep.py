"""n-step transitions per env, with the right episode ends, and initial priorities.

For env ``i`` the accumulator holds the last ``k <= n`` one-step records
``(s_t ids, a_t, r_t clipped, Q(s_t, a_t))``. Each vector step it emits:

* a full transition when ``n`` records are held and the episode goes on:
  ``R = sum_{j<n} gamma^j r_{t+j}``, discount ``gamma^n``, ``s' = s_{t+n}``;
* at an episode end or a terminal, every held record (the partial ``k < n`` ones included):
  ``R = sum_{j<k} gamma^j r_{t+j}`` with discount ``0`` after a terminal step
  (no bootstrap) or ``gamma^k`` after a time-limit truncation, where ``s'`` is the
  final frame's stack (the value of the cut-off state is still worth bootstrapping,
  Pardo et al. 2018).

``terminated`` is the learner's terminal: the game is over, or (with
``--episodic-life``) a life was lost. After a lost life the game goes on: the
env's next step is an ordinary, active one (no NEXT_STEP reset), so the next
record's ``s`` is the continuing stack and only the windows are flushed.

Emitted transitions are *pending*: their initial priority
``|R + discount * max_a Q(s', a) - Q(s, a)|`` needs ``Q(s', .)``, which the actor
computes anyway at its next inference on the current stacks (the final stack of a
finished env included: its action is ignored by the NEXT_STEP autoreset). So no
extra forward pass is spent on priorities (Ape-X, Horgan et al. 2018).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.types import PRIORITY_FLOOR, STACK, TransitionBatch


def initial_priorities(
    returns: np.ndarray,
    discounts: np.ndarray,
    q_taken: np.ndarray,
    q_next_max: np.ndarray,
    floor: float = PRIORITY_FLOOR,
) -> np.ndarray:
    """``max(|R + discount * max_a Q(s', a) - Q(s, a)|, floor)`` -> float32[k] (all float[k])."""
    td = returns.astype(np.float64) + discounts * q_next_max - q_taken
    return np.maximum(np.abs(td), floor).astype(np.float32)


@dataclass
class PendingTransitions:
    """Transitions waiting for ``max_a Q(s', a)`` from the next inference.

    env:          int64[k]     env row whose next Q-values belong to s'
    obs_ids:      int64[k, 4]  s ids;  next_obs_ids: int64[k, 4] s' ids
    actions:      int64[k];  returns, discounts, q_taken: float32[k]
    """

    env: np.ndarray
    obs_ids: np.ndarray
    next_obs_ids: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    q_taken: np.ndarray

    def __len__(self) -> int:
        return int(self.env.shape[0])

    def complete(self, q_next: np.ndarray, floor: float = PRIORITY_FLOOR) -> TransitionBatch:
        """Priorities from the next step's Q-values ``float32[E, A]`` -> TransitionBatch."""
        q_next_max = q_next.max(axis=1)[self.env] if len(self) else np.zeros(0, np.float32)
        return TransitionBatch(
            obs_ids=self.obs_ids,
            next_obs_ids=self.next_obs_ids,
            actions=self.actions,
            returns=self.returns,
            discounts=self.discounts,
            priorities=initial_priorities(
                self.returns, self.discounts, self.q_taken, q_next_max, floor
            ),
        )


class NStepAccumulator:
    """Per-env n-step windows for E envs, stepped together (not thread-safe).

    ``add`` takes one vector step; rows with ``active[i] == False`` (the NEXT_STEP
    autoreset step, whose action was ignored) are skipped.
    """

    def __init__(self, num_envs: int, n: int, gamma: float):
        if n < 1:
            raise ValueError(f"n_step={n} must be >= 1")
        self.num_envs, self.n, self.gamma = num_envs, n, gamma
        self._obs = np.zeros((num_envs, n, STACK), np.int64)
        self._act = np.zeros((num_envs, n), np.int64)
        self._rew = np.zeros((num_envs, n), np.float64)
        self._q = np.zeros((num_envs, n), np.float32)
        self._count = np.zeros(num_envs, np.int64)
        self._powers = gamma ** np.arange(n + 1, dtype=np.float64)

    def held_ids(self) -> np.ndarray:
        """Frame ids of the s stacks still held (int64[m*4]); frames they need must be kept."""
        mask = np.arange(self.n)[None, :] < self._count[:, None]
        return self._obs[mask].reshape(-1)

    def add(
        self,
        obs_ids: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        q_taken: np.ndarray,
        next_obs_ids: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        active: np.ndarray | None = None,
    ) -> PendingTransitions:
        """One vector step.

        obs_ids, next_obs_ids: int64[E, 4] stacks s_t, s_{t+1}; actions: int64[E];
        rewards: float[E] (already clipped); q_taken: float[E] = Q(s_t, a_t);
        terminated, truncated, active: bool[E].
        """
        n, E = self.n, self.num_envs
        active = np.ones(E, bool) if active is None else np.asarray(active, bool)
        rows = np.flatnonzero(active)
        slot = self._count[rows]
        self._obs[rows, slot] = obs_ids[rows]
        self._act[rows, slot] = actions[rows]
        self._rew[rows, slot] = rewards[rows]
        self._q[rows, slot] = q_taken[rows]
        self._count[rows] += 1

        done = active & (np.asarray(terminated, bool) | np.asarray(truncated, bool))
        full = active & ~done & (self._count == n)
        parts: list[tuple[np.ndarray, ...]] = []
        f = np.flatnonzero(full)
        if f.size:
            parts.append(
                (
                    f,
                    self._obs[f, 0].copy(),
                    next_obs_ids[f],
                    self._act[f, 0].copy(),
                    self._rew[f] @ self._powers[:n],
                    np.full(f.size, self._powers[n]),
                    self._q[f, 0].copy(),
                )
            )
            self._obs[f, :-1] = self._obs[f, 1:]
            self._act[f, :-1] = self._act[f, 1:]
            self._rew[f, :-1] = self._rew[f, 1:]
            self._q[f, :-1] = self._q[f, 1:]
            self._count[f] -= 1
        for i in np.flatnonzero(done):
            k_total = int(self._count[i])
            ks = k_total - np.arange(k_total)  # steps from each record to the end
            rets = np.array(
                [self._rew[i, j:k_total] @ self._powers[: ks[j]] for j in range(k_total)]
            )
            disc = np.zeros(k_total) if terminated[i] else self._powers[ks]
            parts.append(
                (
                    np.full(k_total, i),
                    self._obs[i, :k_total].copy(),
                    np.repeat(next_obs_ids[i][None], k_total, axis=0),
                    self._act[i, :k_total].copy(),
                    rets,
                    disc,
                    self._q[i, :k_total].copy(),
                )
            )
            self._count[i] = 0
        return _pending(parts)


def _pending(parts: list[tuple[np.ndarray, ...]]) -> PendingTransitions:
    if not parts:
        return PendingTransitions(
            env=np.zeros(0, np.int64),
            obs_ids=np.zeros((0, STACK), np.int64),
            next_obs_ids=np.zeros((0, STACK), np.int64),
            actions=np.zeros(0, np.int64),
            returns=np.zeros(0, np.float32),
            discounts=np.zeros(0, np.float32),
            q_taken=np.zeros(0, np.float32),
        )
    cols = list(zip(*parts, strict=True))
    return PendingTransitions(
        env=np.concatenate(cols[0]).astype(np.int64),
        obs_ids=np.concatenate(cols[1]).astype(np.int64),
        next_obs_ids=np.concatenate(cols[2]).astype(np.int64),
        actions=np.concatenate(cols[3]).astype(np.int64),
        returns=np.concatenate(cols[4]).astype(np.float32),
        discounts=np.concatenate(cols[5]).astype(np.float32),
        q_taken=np.concatenate(cols[6]).astype(np.float32),
    )
