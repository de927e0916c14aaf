"""The actor's CPU copy of the Q-network: one batched forward pass per vector step.

Why it may run in bfloat16: on CPUs with AMX / AVX512-BF16 a 1-thread Nature-CNN
forward pass at batch 16 is ~2x faster in bfloat16 than in float32 (bench/actor.py:
inference was half of the actor's time in float32). Acting only needs the argmax
and a first guess of the priority (the learner recomputes priorities when it
samples), so 8 mantissa bits are enough. ``dtype="auto"`` times both at start-up
(~0.2 s) and keeps bfloat16 only where it is clearly faster, so CPUs without bf16
units keep float32. Outputs are always float32.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from common.network import QNetwork, load_numpy_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.2


class ActingNetwork:
    """q_values(obs uint8[E, 4, 84, 84]) -> float32[E, A]. Not thread-safe.

    dtype: "float32", "bfloat16" or "auto" (timed at construction for ``batch``).
    """

    def __init__(self, num_actions: int, dueling: bool, batch: int, dtype: str = "auto"):
        self.net = QNetwork(num_actions, dueling=dueling).eval()
        if dtype == "auto":
            dtype = self._fastest(batch)
        if dtype not in DTYPES:
            raise ValueError(f"inference dtype {dtype!r}; choose auto, float32 or bfloat16")
        self.dtype = dtype
        self.net.to(DTYPES[dtype])

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(obs).to(DTYPES[self.dtype]).div_(255.0)
            return self.net(x).float().numpy()

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Load float32 numpy weights (cast to this network's dtype)."""
        load_numpy_weights(self.net, weights)

    def _fastest(self, batch: int) -> str:
        obs = np.random.default_rng(0).integers(0, 255, (batch, 4, 84, 84), dtype=np.uint8)
        times = {}
        try:
            for name in ("float32", "bfloat16"):
                self.dtype = name
                self.net.to(DTYPES[name])
                for _ in range(2):
                    self.q_values(obs)
                t0 = time.perf_counter()
                for _ in range(4):
                    self.q_values(obs)
                times[name] = time.perf_counter() - t0
        except RuntimeError:  # no bf16 kernels on this build
            return "float32"
        finally:
            self.net.to(torch.float32)
        return "bfloat16" if times["float32"] > BF16_MIN_SPEEDUP * times["bfloat16"] else "float32"
