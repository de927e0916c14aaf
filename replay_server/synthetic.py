"""Real Atari frames and actor-shaped pushes for replay tests and benchmarks.

:class:`SyntheticActor` behaves like an actor as far as the replay can tell:
it steps ``ale_py``'s ``AtariVectorEnv`` (or cycles a pool of real frames) with
random actions, numbers each new frame ``make_frame_id(incarnation, counter)``,
keeps a 4-frame stack per env and emits n-step transitions that refer to frames
by id. Priorities are random (the real actor computes |TD error|). It is not the
production actor (``actors/``); it exists so the replay can be measured alone.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from common.types import STACK, TransitionBatch, make_frame_id


def pong_frames(
    num_envs: int = 8, steps: int = 100, game: str = "pong", seed: int = 0
) -> np.ndarray:
    """uint8[steps * num_envs, 84, 84] real frames from random play."""
    from ale_py.vector_env import AtariVectorEnv

    env = AtariVectorEnv(game, num_envs, stack_num=1, reward_clipping=False, num_threads=1)
    rng = np.random.default_rng(seed)
    n_act = int(env.single_action_space.n)
    try:
        obs, _ = env.reset(seed=seed)
        out = [obs[:, 0].copy()]
        for _ in range(steps - 1):
            obs, *_ = env.step(rng.integers(0, n_act, num_envs))
            out.append(obs[:, 0].copy())
    finally:
        env.close()
    return np.concatenate(out)


class SyntheticActor:
    """Actor-shaped pushes: (new frame ids int64[m], frames uint8[m,84,84], batch).

    game/num_envs: the env stepped (``AtariVectorEnv``, 1 thread); with
    ``frame_pool`` (uint8[P, 84, 84]) frames are taken from it cyclically instead
    and an episode ends every ``pool_episode`` steps.
    """

    def __init__(
        self,
        incarnation: int,
        game: str = "pong",
        num_envs: int = 8,
        n_step: int = 3,
        gamma: float = 0.99,
        seed: int = 0,
        frame_pool: np.ndarray | None = None,
        pool_episode: int = 1000,
    ) -> None:
        self.incarnation = incarnation
        self.num_envs, self.n_step, self.gamma = num_envs, n_step, gamma
        self.rng = np.random.default_rng(seed)
        self.counter = 0
        self.pool, self.pool_episode, self._t = frame_pool, pool_episode, 0
        self.env = None
        if frame_pool is None:
            from ale_py.vector_env import AtariVectorEnv

            self.env = AtariVectorEnv(
                game, num_envs, stack_num=1, reward_clipping=False, num_threads=1
            )
            self.n_actions = int(self.env.single_action_space.n)
            obs, _ = self.env.reset(seed=seed)
            first = obs[:, 0]
        else:
            self.n_actions = 6
            first = self._pool_frames()
        self._new_ids: list[np.ndarray] = []
        self._new_frames: list[np.ndarray] = []
        ids = self._store(first)
        self.stacks = [deque([int(i)] * STACK, maxlen=STACK) for i in ids]
        self.pending: list[deque] = [deque() for _ in range(num_envs)]
        self.needs_reset = np.zeros(num_envs, bool)
        self._out: list[tuple] = []

    def _pool_frames(self) -> np.ndarray:
        assert self.pool is not None
        idx = (self._t * self.num_envs + np.arange(self.num_envs)) % len(self.pool)
        self._t += 1
        return self.pool[idx]

    def _store(self, frames: np.ndarray) -> np.ndarray:
        ids = make_frame_id(self.incarnation, self.counter + np.arange(len(frames), dtype=np.int64))
        self.counter += len(frames)
        self._new_ids.append(ids)
        self._new_frames.append(np.ascontiguousarray(frames))
        return ids

    def step(self) -> None:
        """One vector step: new frames stored, completed transitions queued."""
        actions = self.rng.integers(0, self.n_actions, self.num_envs)
        if self.env is not None:
            obs, rew, term, trunc, _ = self.env.step(actions)
            frames, done = obs[:, 0], term | trunc
        else:
            frames = self._pool_frames()
            rew = self.rng.choice([-1.0, 0.0, 1.0], self.num_envs, p=[0.01, 0.98, 0.01])
            done = np.full(self.num_envs, self._t % self.pool_episode == 0)
        ids = self._store(frames)
        for e in range(self.num_envs):
            stack, pend = self.stacks[e], self.pending[e]
            if self.needs_reset[e]:  # this obs is the first of a new episode
                self.stacks[e] = deque([int(ids[e])] * STACK, maxlen=STACK)
                pend.clear()
                self.needs_reset[e] = False
                continue
            pend.append((tuple(stack), int(actions[e]), float(rew[e])))
            stack.append(int(ids[e]))
            if len(pend) == self.n_step or done[e]:
                while pend and (len(pend) == self.n_step or done[e]):
                    s, a, _ = pend[0]
                    rs = [p[2] for p in pend]
                    ret = sum(self.gamma**i * r for i, r in enumerate(rs))
                    disc = 0.0 if done[e] else self.gamma ** len(rs)
                    self._out.append((s, tuple(stack), a, ret, disc))
                    pend.popleft()
                    if not done[e]:
                        break
            if done[e]:
                self.needs_reset[e] = True

    def push(self, steps: int) -> tuple[np.ndarray, np.ndarray, TransitionBatch]:
        """Step ``steps`` times; return everything new since the last push."""
        for _ in range(steps):
            self.step()
        fids = np.concatenate(self._new_ids)
        frames = np.concatenate(self._new_frames)
        self._new_ids, self._new_frames = [], []
        out, self._out = self._out, []
        n = len(out)
        batch = TransitionBatch(
            obs_ids=np.array([o[0] for o in out], np.int64).reshape(n, STACK),
            next_obs_ids=np.array([o[1] for o in out], np.int64).reshape(n, STACK),
            actions=np.array([o[2] for o in out], np.int64),
            returns=np.array([o[3] for o in out], np.float32),
            discounts=np.array([o[4] for o in out], np.float32),
            priorities=(np.abs(self.rng.normal(size=n)) + 0.01).astype(np.float32),
        )
        return fids, frames, batch

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
