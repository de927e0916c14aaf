"""The Q-network: a convolutional torso with an optional dueling head.

Two torsos (``--network``):
  ``nature``  Mnih et al. 2015: conv 32x8x8/4, 64x4x4/2, 64x3x3/1, 512 hidden units
              (3.29M parameters dueling; ~11M multiply-adds per frame stack)
  ``small``   Mnih et al. 2013: conv 16x8x8/4, 32x4x4/2, 256 hidden units (1.34M
              parameters dueling, most in the two hidden layers; ~3.6M multiply-adds
              per frame stack): ~2.5x the updates/s of ``nature`` on one CPU thread
              (bench/learner.py --steps); not the CPU profile's default, since it did
              not win on time-to-score (docs/benchmarks.md)

Input ``uint8[B, 4, 84, 84]`` (or float already scaled to [0, 1]); output
``float32[B, A]`` Q-values, a linear layer (no softmax: Q-values are unbounded).
Dueling (Wang et al. 2016): ``Q = V + A - mean(A)``.

Precision: the *trunk* (the convolutional torso and the hidden layer (512 or 256 units) of
each stream) may run in bfloat16, under ``torch.autocast`` (the learner) or with
its weights cast (`set_trunk_dtype`, the actors), where that is faster. The
*output layers* (hidden -> 1 for V, hidden -> A for the advantages, or -> A without
dueling) and the dueling aggregation always run in float32, with autocast off
around them, so the Q-values are float32 in every case. Why: bfloat16 has 8
significant bits, a step of 0.031 at Q = 5 and 0.125 at Q = 20. Action gaps and
late TD errors are smaller than that: a bfloat16 *output* turns them into rounding
noise (argmax ties go to the lowest index, priorities and Huber gradients are
quantized) and the acting policy differs from the float32 one evaluation plays.

Why the hidden layers may still be bfloat16 (a departure from "heads in float32"
that measurement supports): at the actors' batch of 16 the two 3136x512 layers
are half of a forward pass, memory-bound, and in float32 they took away the whole
bfloat16 gain (1.03x instead of 1.8x on this project's AVX512-BF16 CPU; learner
update at batch 64: 1.6x instead of 1.85x). Their error is of the same size as
the bfloat16 torso's, which is accepted anyway, and is not a grid: on a
random-init network with Q up to 8 (256 Atari-like inputs), the largest error of
the action-relative values Q - mean(Q) was 0.0003 with a float32 hidden layer,
0.0004 with a bfloat16 one, and 0.023 with a bfloat16 output (which alone also
flipped 0.8% of the argmaxes and left 327 distinct values of 1,536).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NETWORKS = ("nature", "small")


def _torso(network: str, in_frames: int) -> tuple[nn.Sequential, int, int]:
    """(torso, its output features, hidden units per stream) of ``network``."""
    if network == "nature":
        torso = nn.Sequential(
            nn.Conv2d(in_frames, 32, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, kernel_size=3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        return torso, 64 * 7 * 7, 512
    if network == "small":
        torso = nn.Sequential(
            nn.Conv2d(in_frames, 16, kernel_size=8, stride=4),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.ReLU(),
            nn.Flatten(),
        )
        return torso, 32 * 9 * 9, 256
    raise ValueError(f"network {network!r}; choose one of {', '.join(NETWORKS)}")


def network_of(model_state: dict) -> str:
    """Which torso (``nature`` or ``small``) a `QNetwork` state dict holds."""
    return "nature" if "torso.4.weight" in model_state else "small"


class QNetwork(nn.Module):
    def __init__(
        self, num_actions: int, dueling: bool = True, in_frames: int = 4, network: str = "nature"
    ):
        super().__init__()
        self.num_actions = num_actions
        self.dueling = dueling
        self.network = network
        self.torso, features, hidden = _torso(network, in_frames)
        if dueling:
            self.value = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, 1))
            self.advantage = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )
        else:
            self.head = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_actions)
            )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values float32[B, A] of ``obs`` uint8[B, 4, 84, 84] (or float in [0, 1])."""
        dtype = self.torso[0].weight.dtype  # bfloat16 after set_trunk_dtype
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs
        h = self.torso(x.to(dtype))
        if not self.dueling:
            return self._output(self.head, h)
        value = self._output(self.value, h)
        adv = self._output(self.advantage, h)
        with torch.autocast(h.device.type, enabled=False):
            return value + adv - adv.mean(dim=1, keepdim=True)

    @staticmethod
    def _output(stream: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
        """One stream: hidden layer in the trunk's precision, output layer float32."""
        hidden = stream[1](stream[0](features))
        with torch.autocast(hidden.device.type, enabled=False):
            return stream[2](hidden.float())

    def output_layers(self) -> list[nn.Linear]:
        """The layers that always run in float32 (hidden -> 1 or A)."""
        streams = [self.value, self.advantage] if self.dueling else [self.head]
        return [s[2] for s in streams]

    def set_trunk_dtype(self, dtype: torch.dtype) -> QNetwork:
        """Cast every parameter but the output layers' to ``dtype`` (those stay float32)."""
        keep = {id(p) for layer in self.output_layers() for p in layer.parameters()}
        for p in self.parameters():
            if id(p) not in keep:
                p.data = p.data.to(dtype)
        return self


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
