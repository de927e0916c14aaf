"""Per-env 4-frame stacks of pixels (for inference) and of frame ids (for the replay).

An episode's first frame fills the whole stack (the DQN convention; ale-py's own
``stack_num`` pads with zero frames instead, so the oldest slots of an episode's
first three stacks differ from it there, and only there). A stack never mixes two
episodes: a row whose ``reset`` flag is set starts over from its new frame.
"""

from __future__ import annotations

import numpy as np

from common.types import FRAME_SHAPE, STACK


class FrameStacker:
    """E stacks, oldest frame first. Not thread-safe.

    obs: uint8[E, 4, 84, 84] the stacked pixels the network sees
    ids: int64[E, 4]         the frame ids of the same frames
    """

    def __init__(self, num_envs: int):
        self.num_envs = num_envs
        self.obs = np.zeros((num_envs, STACK, *FRAME_SHAPE), np.uint8)
        self.ids = np.zeros((num_envs, STACK), np.int64)

    def reset(self, frames: np.ndarray, ids: np.ndarray) -> None:
        """Start every stack: frames uint8[E, 84, 84], ids int64[E]."""
        self.obs[:] = frames[:, None]
        self.ids[:] = ids[:, None]

    def step(self, frames: np.ndarray, ids: np.ndarray, reset: np.ndarray) -> None:
        """Push one frame per env; rows with ``reset[i]`` (bool[E]) start a new episode."""
        self.obs[:, :-1] = self.obs[:, 1:]
        self.obs[:, -1] = frames
        self.ids[:, :-1] = self.ids[:, 1:]
        self.ids[:, -1] = ids
        rows = np.flatnonzero(reset)
        if rows.size:
            self.obs[rows] = frames[rows][:, None]
            self.ids[rows] = ids[rows][:, None]
