"""Real Atari frames and actor-shaped pushes for replay tests and benchmarks.

:class:`SyntheticActor` behaves like an actor as far as the replay can tell: it
steps a `common.env.FrameEnv` (or cycles a pool of real frames) with random
actions, numbers each new frame ``make_frame_id(incarnation, counter)``, keeps a
4-frame id stack per env (`common.stacking`) and emits n-step transitions
(`common.nstep`: the actors' own accumulator, so a time-limit truncation
bootstraps and a terminal does not, exactly as in training). Priorities are
random (the real actor computes |TD error|). It is not the production actor
(``actors/``) and is not shipped with the package: it exists so that the replay
can be tested and measured alone (``tests/``, ``bench/replay.py``,
``bench/learner.py``).
"""

from __future__ import annotations

import numpy as np

from common.config import EnvConfig
from common.env import make_vector_env
from common.nstep import NStepAccumulator
from common.stacking import FrameStack
from common.types import STACK, TransitionBatch, make_frame_id


def _env(game: str, num_envs: int, seed: int, max_episode_frames: int = 108_000):
    # sticky 0 and raw rewards: a plain AtariVectorEnv, as the actors build it
    cfg = EnvConfig(env=game, sticky_actions=0.0, max_episode_frames=max_episode_frames)
    return make_vector_env(cfg, num_envs, seed=seed)


def pong_frames(
    num_envs: int = 8, steps: int = 100, game: str = "pong", seed: int = 0
) -> np.ndarray:
    """uint8[steps * num_envs, 84, 84] real frames from random play."""
    env = _env(game, num_envs, seed)
    rng = np.random.default_rng(seed)
    try:
        out = [env.reset(seed=seed)]
        for _ in range(steps - 1):
            out.append(env.step(rng.integers(0, env.num_actions, num_envs)).frames)
    finally:
        env.close()
    return np.concatenate(out)


class SyntheticActor:
    """Actor-shaped pushes: (new frame ids int64[m], frames uint8[m,84,84], batch).

    game/num_envs: the env stepped (`common.env.make_vector_env`, sticky actions
    0, episodes capped at ``max_episode_frames`` emulator frames: a truncation);
    with ``frame_pool`` (uint8[P, 84, 84]) frames are taken from it cyclically
    instead, rewards are random in {-1, 0, 1} and every ``pool_episode`` steps all
    episodes terminate.
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
        max_episode_frames: int = 108_000,
    ) -> None:
        self.incarnation = incarnation
        self.num_envs, self.n_step, self.gamma = num_envs, n_step, gamma
        self.rng = np.random.default_rng(seed)
        self.counter = 0
        self.pool, self.pool_episode, self._t = frame_pool, pool_episode, 0
        self._pool_done = np.zeros(num_envs, bool)
        self.env = None
        if frame_pool is None:
            self.env = _env(game, num_envs, seed, max_episode_frames)
            self.n_actions = self.env.num_actions
            first = self.env.reset(seed=seed)
        else:
            self.n_actions = 6
            first = self._pool_frames()
        self._new_ids: list[np.ndarray] = []
        self._new_frames: list[np.ndarray] = []
        self.stacks = FrameStack(num_envs, (), np.int64)
        self.stacks.reset(self._store(first))
        self.nstep = NStepAccumulator(num_envs, n_step, gamma)
        self._out: list[TransitionBatch] = []

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

    def _step_env(self, actions: np.ndarray) -> tuple[np.ndarray, ...]:
        """(frames, rewards, terminated, truncated, reset), NEXT_STEP semantics."""
        if self.env is not None:
            s = self.env.step(actions)
            return s.frames, s.rewards, s.terminated, s.truncated, s.reset
        reset = self._pool_done.copy()
        frames = self._pool_frames()
        rew = self.rng.choice([-1.0, 0.0, 1.0], self.num_envs, p=[0.01, 0.98, 0.01])
        term = np.full(self.num_envs, self._t % self.pool_episode == 0) & ~reset
        self._pool_done = term
        return frames, rew.astype(np.float32), term, np.zeros(self.num_envs, bool), reset

    def step(self) -> None:
        """One vector step: new frames stored, completed transitions queued."""
        actions = self.rng.integers(0, self.n_actions, self.num_envs)
        frames, rew, term, trunc, reset = self._step_env(actions)
        obs_ids = self.stacks.values.copy()
        self.stacks.push(self._store(frames), reset)
        pending = self.nstep.add(
            obs_ids, actions, rew, np.zeros(self.num_envs, np.float32), self.stacks.values,
            term, trunc, active=~reset,
        )  # fmt: skip
        if len(pending):
            self._out.append(
                TransitionBatch(
                    obs_ids=pending.obs_ids,
                    next_obs_ids=pending.next_obs_ids,
                    actions=pending.actions,
                    returns=pending.returns,
                    discounts=pending.discounts,
                    priorities=(np.abs(self.rng.normal(size=len(pending))) + 0.01).astype(
                        np.float32
                    ),
                )
            )

    def push(self, steps: int) -> tuple[np.ndarray, np.ndarray, TransitionBatch]:
        """Step ``steps`` times; return everything new since the last push."""
        for _ in range(steps):
            self.step()
        fids = np.concatenate(self._new_ids)
        frames = np.concatenate(self._new_frames)
        self._new_ids, self._new_frames = [], []
        out, self._out = self._out, []
        if out:
            batch = TransitionBatch.concat(out)
        else:
            batch = TransitionBatch(
                obs_ids=np.zeros((0, STACK), np.int64),
                next_obs_ids=np.zeros((0, STACK), np.int64),
                actions=np.zeros(0, np.int64),
                returns=np.zeros(0, np.float32),
                discounts=np.zeros(0, np.float32),
                priorities=np.zeros(0, np.float32),
            )
        return fids, frames, batch

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
