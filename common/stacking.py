"""Frame stacking: the one copy, used by the actors, evaluation and the bench writer.

A stack holds the last 4 items of an env, oldest first: pixels ``uint8[84, 84]``
for the network, or frame ids ``int64`` for the replay. An episode's first item
fills the whole stack (the DQN convention; ale-py's own ``stack_num`` pads with
zero frames instead, so the oldest slots of an episode's first three stacks differ
from it there, and only there). A stack never mixes two episodes: a row whose
``reset`` flag is set starts over from its new item.

``reset`` means a new *episode* (the NEXT_STEP autoreset step of `common.env`),
never a lost life: with ``--episodic-life`` the game goes on after a life loss,
and so does its stack.
"""

from __future__ import annotations

import numpy as np

from common.types import FRAME_SHAPE, STACK


class FrameStack:
    """E rolling stacks of ``depth`` items of shape ``item_shape``. Not thread-safe.

    values: dtype[E, depth, *item_shape], oldest item first.
    """

    def __init__(
        self,
        num_envs: int,
        item_shape: tuple[int, ...] = FRAME_SHAPE,
        dtype: type | np.dtype = np.uint8,
        depth: int = STACK,
    ):
        self.values = np.zeros((num_envs, depth, *item_shape), dtype)

    def reset(self, items: np.ndarray) -> None:
        """Start every stack from ``items`` dtype[E, *item_shape]."""
        self.values[:] = items[:, None]

    def push(self, items: np.ndarray, reset: np.ndarray | None = None) -> None:
        """Append one item per env; rows with ``reset[i]`` (bool[E]) start over from it."""
        self.values[:, :-1] = self.values[:, 1:]
        self.values[:, -1] = items
        if reset is not None:
            rows = np.flatnonzero(reset)
            if rows.size:
                self.values[rows] = items[rows][:, None]


class FrameStacker:
    """The actor's pair of stacks: pixels for inference, frame ids for the replay.

    obs: uint8[E, 4, 84, 84] the stacked pixels the network sees
    ids: int64[E, 4]         the frame ids of the same frames
    """

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        self._obs = FrameStack(num_envs, FRAME_SHAPE, np.uint8)
        self._ids = FrameStack(num_envs, (), np.int64)

    @property
    def obs(self) -> np.ndarray:
        return self._obs.values

    @property
    def ids(self) -> np.ndarray:
        return self._ids.values

    def reset(self, frames: np.ndarray, ids: np.ndarray) -> None:
        """Start every stack: frames uint8[E, 84, 84], ids int64[E]."""
        self._obs.reset(frames)
        self._ids.reset(ids)

    def step(self, frames: np.ndarray, ids: np.ndarray, reset: np.ndarray) -> None:
        """Push one frame per env; rows with ``reset[i]`` (bool[E]) start a new episode."""
        self._obs.push(frames, reset)
        self._ids.push(ids, reset)
