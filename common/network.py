"""The Q-network: Nature DQN torso (Mnih et al. 2015) with an optional dueling head.

Input ``uint8[B, 4, 84, 84]`` (or float already scaled to [0, 1]); output
``float32[B, A]`` Q-values, a linear layer (no softmax: Q-values are unbounded).
Dueling (Wang et al. 2016): ``Q = V + A - mean(A)``.
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
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs
        h = self.torso(x)
        if not self.dueling:
            return self.head(h)
        adv = self.advantage(h)
        return self.value(h) + adv - adv.mean(dim=1, keepdim=True)


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
