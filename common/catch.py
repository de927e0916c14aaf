"""Catch: a tiny pixel game for checking that the whole pipeline learns.

A ball starts in a random column of the top row of a 10x5 grid and falls one row
per step; a 1-cell paddle on the bottom row moves left, stays or moves right.
When the ball reaches the bottom row the episode ends: +1 if the paddle is under
it, -1 otherwise (9 steps an episode). Random play scores about -0.6; a perfect
player scores 1. Frames are ``uint8[84, 84]`` like preprocessed Atari frames, so
Catch runs through the same actors, replay and learner. Registered in gymnasium
as ``ApexCatch-v0`` by `common.env`.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

ROWS, COLS = 10, 5
CELL_H, CELL_W = 8, 16  # 10*8 = 80 rows, 5*16 = 80 columns inside the 84x84 frame
PAD = 2


class CatchEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode: str | None = None):
        self.observation_space = gym.spaces.Box(0, 255, shape=(84, 84), dtype=np.uint8)
        self.action_space = gym.spaces.Discrete(3)  # 0 left, 1 stay, 2 right
        self.render_mode = render_mode
        self._ball_row = 0
        self._ball_col = 0
        self._paddle = COLS // 2

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._ball_row = 0
        self._ball_col = int(self.np_random.integers(COLS))
        self._paddle = int(self.np_random.integers(COLS))
        return self._frame(), {}

    def step(self, action: int):
        self._paddle = int(np.clip(self._paddle + int(action) - 1, 0, COLS - 1))
        self._ball_row += 1
        terminated = self._ball_row == ROWS - 1
        reward = 0.0
        if terminated:
            reward = 1.0 if self._paddle == self._ball_col else -1.0
        return self._frame(), reward, terminated, False, {}

    def render(self) -> np.ndarray:
        return np.repeat(self._frame()[..., None], 3, axis=-1)

    def _frame(self) -> np.ndarray:
        frame = np.zeros((84, 84), dtype=np.uint8)
        self._cell(frame, self._ball_row, self._ball_col, 255)
        self._cell(frame, ROWS - 1, self._paddle, 128)
        return frame

    @staticmethod
    def _cell(frame: np.ndarray, row: int, col: int, value: int) -> None:
        r, c = PAD + row * CELL_H, PAD + col * CELL_W
        frame[r : r + CELL_H, c : c + CELL_W] = value
