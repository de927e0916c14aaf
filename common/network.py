"""The Q-network: Nature DQN torso (Mnih et al. 2015) with an optional dueling head.

Input ``uint8[B, 4, 84, 84]`` (or float already scaled to [0, 1]); output
``float32[B, A]`` Q-values, a linear layer (no softmax: Q-values are unbounded).
Dueling (Wang et al. 2016): ``Q = V + A - mean(A)``.

Precision: the convolutional torso may run in bfloat16 (under ``torch.autocast``,
or with its weights cast, as the actors do), where that is faster. The heads and
the dueling aggregation always run in float32, with autocast turned off around
them, so the output is float32 in every case. Why: bfloat16 has 8 mantissa bits,
a step of 0.031 at Q = 5 and 0.125 at Q = 20. Action gaps and late TD errors are
smaller than that: in bfloat16 they turn into rounding noise (argmax ties go to
the lowest index, priorities and Huber gradients are quantized) and the acting
policy differs from the float32 one that evaluation plays.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class QNetwork(nn.Module):
    def __init__(self, num_actions: int, dueling: bool = True, in_frames: int = 4):
        super().__init__()
        self.num_actions = num_actions
        self.dueling = dueling
        self.torso = nn.Sequential(
            nn.Conv2d(in_frames, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        features = 64 * 7 * 7
        if dueling:
            self.value = nn.Sequential(nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, 1))
            self.advantage = nn.Sequential(
                nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, num_actions)
            )
        else:
            self.head = nn.Sequential(
                nn.Linear(features, 512), nn.ReLU(), nn.Linear(512, num_actions)
            )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values float32[B, A] of ``obs`` uint8[B, 4, 84, 84] (or float in [0, 1])."""
        dtype = self.torso[0].weight.dtype  # bfloat16 where the torso was cast
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs
        h = self.torso(x.to(dtype))
        with torch.autocast(h.device.type, enabled=False):
            return self.q_head(h.float())

    def q_head(self, features: torch.Tensor) -> torch.Tensor:
        """float32[B, A] from torso features float32[B, 3136]; float32 weights."""
        if not self.dueling:
            return self.head(features)
        adv = self.advantage(features)
        return self.value(features) + adv - adv.mean(dim=1, keepdim=True)


def weights_to_numpy(model: nn.Module) -> dict[str, np.ndarray]:
    """State dict as CPU float numpy arrays (what travels to actors)."""
    return {k: v.detach().to("cpu").float().numpy().copy() for k, v in model.state_dict().items()}


def load_numpy_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Load `weights_to_numpy` output; raises ValueError on a shape/key mismatch."""
    state = model.state_dict()
    missing = set(state) - set(weights)
    extra = set(weights) - set(state)
    if missing or extra:
        raise ValueError(
            f"weights do not fit this network (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    with torch.no_grad():
        for k, v in state.items():
            src = torch.from_numpy(np.array(weights[k], copy=True))  # Ray's arrays are read-only
            if tuple(src.shape) != tuple(v.shape):
                raise ValueError(
                    f"weights do not fit this network: {k} is {tuple(src.shape)}, expected {tuple(v.shape)}"
                )
            v.copy_(src)
