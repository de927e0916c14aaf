"""The actor's CPU copy of the Q-network: one batched forward pass per vector step.

Why the trunk may run in bfloat16: on CPUs with AMX / AVX512-BF16 a 1-thread
Nature-CNN forward pass at batch 16 is ~2x faster in bfloat16 than in float32
(bench/actor.py: inference was half of the actor's time in float32).
``dtype="bfloat16"`` casts the trunk (torso and hidden layers); the output layers
and the dueling aggregation stay float32 (`common.network`), so the Q-values,
their argmax and the initial priorities are float32 and small action gaps are
not rounded away. ``dtype="auto"`` times both at start-up (~0.2 s) and keeps
bfloat16 only where it is clearly faster (``BF16_MIN_SPEEDUP``), so CPUs without
bf16 units keep float32.
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

    dtype: "float32", "bfloat16" (the trunk's; output layers are always float32) or
    "auto" (timed at construction for ``batch``).
    """

    def __init__(
        self,
        num_actions: int,
        dueling: bool,
        batch: int,
        dtype: str = "auto",
        network: str = "nature",
    ):
        self.net = QNetwork(num_actions, dueling=dueling, network=network).eval()
        if dtype == "auto":
            dtype = self._fastest(batch)
        if dtype not in DTYPES:
            raise ValueError(f"inference dtype {dtype!r}; choose auto, float32 or bfloat16")
        self._set(dtype)

    def _set(self, dtype: str) -> None:
        self.dtype = dtype
        self.net.set_trunk_dtype(DTYPES[dtype])

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.from_numpy(obs)).numpy()

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Load float32 numpy weights (the trunk's are cast to its dtype)."""
        load_numpy_weights(self.net, weights)

    def _fastest(self, batch: int) -> str:
        obs = np.random.default_rng(0).integers(0, 255, (batch, 4, 84, 84), dtype=np.uint8)
        times = {}
        try:
            for name in ("float32", "bfloat16"):
                self._set(name)
                for _ in range(2):
                    self.q_values(obs)
                t0 = time.perf_counter()
                for _ in range(4):
                    self.q_values(obs)
                times[name] = time.perf_counter() - t0
        except RuntimeError:  # no bf16 kernels on this build
            return "float32"
        finally:
            self._set("float32")
        return "bfloat16" if times["float32"] > BF16_MIN_SPEEDUP * times["bfloat16"] else "float32"
