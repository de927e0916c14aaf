"""The learner: online + target Q-networks, one optimizer, one `step(batch)`.

One code path for CPU and CUDA. On CUDA the batch's uint8 frames are copied
into reusable pinned host buffers and sent with ``non_blocking`` copies (frames
stay uint8 until they are on the device: 4x fewer bytes over PCIe), the networks
run in ``channels_last``, and ``torch.compile`` is applied when ``cfg.learner.compile``.
On CPU the same code runs without copies (``torch.from_numpy``), with denormal
floats flushed to zero (see ``__init__``: a 10-40x slowdown otherwise). Adam is
torch's fused kernel on both (CPU too since torch 2.4; bench/learner.py).

Per update, each frame batch is converted from uint8 to float once (``s'`` feeds
both the online and the target network under Double DQN), and a bfloat16
learner keeps its target network's trunk in bfloat16 (cast once per target copy,
not by autocast on every update).

Precision (``--learner-dtype``): ``bfloat16`` runs the trunk (convolutions and
the 512-unit hidden layers) under bf16 autocast, on CUDA and CPU alike; the
output layers, the dueling aggregation, the Double-DQN argmax, the targets, the TD errors (new priorities)
and the loss are float32 either way (`common.network`, `learner.losses`).
``auto`` times a few forward/backward passes in both at start-up
(`probe_dtype`) and takes bfloat16 only where it is at least
``BF16_MIN_SPEEDUP`` times faster. Master weights and optimizer state are float32.

Call order (one update):
  1. batch -> device (uint8 frames, float32 returns/discounts/weights)
  2. s, s' -> float in [0, 1] (once each); Q_online(s), and without gradient
     Q_online(s') (double) and Q_target(s')
  3. `losses.td_targets` + `losses.dqn_loss` (importance-weighted Huber)
  4. backward, clip the gradient norm to ``grad_clip`` (Ape-X: 40), optimizer step
  5. ``updates += 1``; every ``target_update`` updates copy online -> target
  6. one device->host transfer: new priorities |TD| and the scalars
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import Config
from common.network import QNetwork, weights_to_numpy
from common.types import SampleBatch
from learner.losses import dqn_loss, td_targets

log = logging.getLogger(__name__)

ADAM_EPS = 1.5e-4  # Rainbow/Ape-X-era Adam epsilon for Atari (Hessel et al. 2018)
RMSPROP_DECAY = 0.95  # Ape-X centered RMSProp
# Ape-X's centered RMSProp epsilon is 1.5e-7 in TensorFlow, which adds it INSIDE the
# square root: step = lr * g / sqrt(v + eps_tf), with v = E[g^2] - E[g]^2. torch adds
# it outside: lr * g / (sqrt(v) + eps). Equal denominators where eps matters (v -> 0)
# need eps = sqrt(eps_tf) = 3.87e-4; for v >> eps_tf both are sqrt(v), and in between
# the torch denominator is at most sqrt(2) times TensorFlow's (at v = eps_tf:
# 2 sqrt(eps_tf) vs sqrt(2 eps_tf)). Taking 1.5e-7 literally would allow steps up
# to 2,600 times larger on parameters whose gradient barely varies.
RMSPROP_EPS_TF = 1.5e-7
RMSPROP_EPS = math.sqrt(RMSPROP_EPS_TF)
BF16_MIN_SPEEDUP = 1.1  # `auto` keeps float32 unless bfloat16 is clearly faster


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class DeviceBatch:
    """A `SampleBatch` on the learner's device: obs/next_obs uint8[B, 4, 84, 84]
    (channels_last on CUDA), actions int64[B], returns/discounts/weights float32[B]."""

    obs: torch.Tensor
    next_obs: torch.Tensor
    actions: torch.Tensor
    returns: torch.Tensor
    discounts: torch.Tensor
    weights: torch.Tensor


class Learner:
    """Double/Dueling n-step DQN learner. Not thread-safe: call from one thread.

    cfg:         the run's `Config` (learner section: optimizer, lr, target_update,
                 grad_clip, dueling, double, compile, torch_threads, learner_dtype;
                 run.seed seeds the network initialisation)
    num_actions: the game's action count A
    device:      ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``

    Attributes: ``device`` (torch.device), ``updates`` (int, optimizer steps so far),
    ``online``/``target`` (QNetwork), ``optimizer``, ``dtype`` ("float32" or
    "bfloat16": the trunk's compute precision in use), ``dtype_reason`` (str: why,
    with the probe's timings when ``learner_dtype`` is auto).
    """

    def __init__(self, cfg: Config, num_actions: int, device: str | torch.device = "auto"):
        lc = cfg.learner
        self.cfg = cfg
        self.num_actions = num_actions
        self.device = resolve_device(device)
        self.cuda = self.device.type == "cuda"
        self.double = lc.double
        self.target_update = lc.target_update
        self.grad_clip = lc.grad_clip
        self.updates = 0
        if lc.torch_threads > 0:
            torch.set_num_threads(lc.torch_threads)
        if not self.cuda:
            # Process-wide. Without it, the first updates on mostly-black frames
            # (Catch, Atari backgrounds) produce denormal floats and a CPU update
            # runs 10-40x slower (measured: 0.4-1.4 s vs 0.036 s at batch 32).
            torch.set_flush_denormal(True)
        torch.manual_seed(cfg.run.seed)
        self.online = QNetwork(num_actions, dueling=lc.dueling, network=cfg.network()).to(
            self.device
        )
        if self.cuda:
            self.online = self.online.to(memory_format=torch.channels_last)
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self.optimizer = self._make_optimizer(cfg)
        self._pinned: dict[str, torch.Tensor] = {}
        batch_size = cfg.batch_size(self.device.type)
        self.dtype, self.dtype_reason = self._pick_dtype(lc.learner_dtype, batch_size)
        if self.dtype == "bfloat16":  # its trunk cast once here and per copy, not per update
            self.target.set_trunk_dtype(torch.bfloat16)
        log.info("learner: %s on %s (%s)", self.dtype, self.device, self.dtype_reason)
        self._online_fn: nn.Module = self.online
        self._target_fn: nn.Module = self.target
        if lc.compile and self.cuda:
            self._online_fn = torch.compile(self.online)  # type: ignore[assignment]
            self._target_fn = torch.compile(self.target)  # type: ignore[assignment]

    def _make_optimizer(self, cfg: Config) -> torch.optim.Optimizer:
        params = list(self.online.parameters())
        lr = cfg.learning_rate()
        if cfg.learner.optimizer == "rmsprop":
            return torch.optim.RMSprop(
                params, lr=lr, alpha=RMSPROP_DECAY, eps=RMSPROP_EPS, centered=True
            )
        try:  # fused on CUDA and, since torch 2.4, on CPU: one kernel for all parameters
            return torch.optim.Adam(params, lr=lr, eps=ADAM_EPS, fused=True)
        except (RuntimeError, ValueError):  # a device or build without the fused kernel
            return torch.optim.Adam(params, lr=lr, eps=ADAM_EPS)

    def _pick_dtype(self, wanted: str, batch_size: int) -> tuple[str, str]:
        if wanted in ("float32", "bfloat16"):
            return wanted, "--learner-dtype " + wanted
        if wanted != "auto":
            raise ValueError(f"learner_dtype={wanted!r}; choose auto, float32 or bfloat16")
        try:
            times = self.probe_dtype(batch_size)
        except RuntimeError as exc:  # no bf16 kernels on this build/device
            return "float32", f"auto: bfloat16 failed ({exc})"
        speedup = times["float32"] / times["bfloat16"]
        pick = "bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
        return pick, (
            f"auto: bfloat16 {speedup:.2f}x float32 at batch {batch_size} "
            f"({1e3 * times['float32']:.1f} vs {1e3 * times['bfloat16']:.1f} ms per forward/backward)"
        )

    def probe_dtype(self, batch_size: int, reps: int = 3) -> dict[str, float]:
        """Seconds per forward/backward pass of one update (Q(s), Q(s') twice, backward;
        no optimizer step, so nothing changes) on a random batch, per dtype:
        ``{"float32": s, "bfloat16": s}``. Two untimed passes of each first, then
        ``reps`` timed passes of each, alternating (load from other processes hits
        both alike)."""
        rng = np.random.default_rng(0)
        shape = (batch_size, 4, 84, 84)
        obs = self._to_device("probe", rng.integers(0, 256, shape, dtype=np.uint8))
        if self.cuda:
            obs = obs.contiguous(memory_format=torch.channels_last)
        actions = torch.zeros(batch_size, dtype=torch.int64, device=self.device)

        def one_pass(bf16: bool) -> float:
            self._sync()
            t0 = time.perf_counter()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                q = self.online(obs)
                with torch.no_grad():
                    self.target(obs)
                    self.online(obs)
            q.gather(1, actions.unsqueeze(1)).sum().backward()
            self._sync()
            return time.perf_counter() - t0

        times = {"float32": 0.0, "bfloat16": 0.0}
        for i in range(2 + reps):
            for name in times:
                t = one_pass(name == "bfloat16")
                if i >= 2:
                    times[name] += t / reps
        self.optimizer.zero_grad(set_to_none=True)
        self._pinned.pop("probe", None)
        return times

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- data ---------------------------------------------------------------
    def _to_device(self, name: str, arr: np.ndarray) -> torch.Tensor:
        """numpy -> device tensor of the same dtype. CUDA: through a reusable pinned
        buffer with a non-blocking copy (safe to reuse: `step` synchronises at its
        end); CPU: zero-copy ``torch.from_numpy``."""
        arr = np.ascontiguousarray(arr)
        if not self.cuda:
            return torch.from_numpy(arr)
        buf = self._pinned.get(name)
        if buf is None or buf.dtype != _TORCH_DTYPES[arr.dtype] or buf.shape[1:] != arr.shape[1:]:
            buf = torch.empty(arr.shape, dtype=_TORCH_DTYPES[arr.dtype], pin_memory=True)
            self._pinned[name] = buf
        elif buf.shape[0] < arr.shape[0]:
            buf = torch.empty(arr.shape, dtype=buf.dtype, pin_memory=True)
            self._pinned[name] = buf
        view = buf[: arr.shape[0]]
        view.numpy()[...] = arr
        return view.to(self.device, non_blocking=True)

    def _frames(self, name: str, arr: np.ndarray) -> torch.Tensor:
        t = self._to_device(name, arr)
        return t.contiguous(memory_format=torch.channels_last) if self.cuda else t

    # ---- the update -----------------------------------------------------------
    def to_device(self, batch: SampleBatch) -> DeviceBatch:
        """The batch's arrays on the learner's device (frames still uint8)."""
        return DeviceBatch(
            obs=self._frames("obs", batch.obs),
            next_obs=self._frames("next_obs", batch.next_obs),
            actions=self._to_device("actions", batch.actions),
            returns=self._to_device("returns", batch.returns),
            discounts=self._to_device("discounts", batch.discounts),
            weights=self._to_device("weights", batch.weights),
        )

    def step(self, batch: SampleBatch) -> dict[str, Any]:
        """One update on ``batch``; returns ``loss``, ``q_mean`` (mean Q(s_t, a_t)),
        ``td_abs_mean``, ``grad_norm`` (before clipping; floats), ``updates`` (int)
        and ``priorities`` (float32[B], the new |TD| per row, for the replay)."""
        return self.update(self.to_device(batch))

    def update(self, batch: DeviceBatch) -> dict[str, Any]:
        """`step` on a batch already on the device (see `to_device`)."""
        actions = batch.actions
        returns, discounts, weights = batch.returns, batch.discounts, batch.weights
        obs, next_obs = _unit_float(batch.obs), _unit_float(batch.next_obs)
        bf16 = self.dtype == "bfloat16"
        with torch.no_grad():  # the target's trunk is already bfloat16 when bf16 is on
            target_next = self._target_fn(next_obs)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            q = self._online_fn(obs)
            with torch.no_grad():
                online_next = self._online_fn(next_obs) if self.double else target_next
        # q, online_next, target_next are float32 (output layers run outside autocast)
        targets = td_targets(online_next, target_next, returns, discounts, self.double)
        loss, td_abs = dqn_loss(q, actions, targets, weights)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.online.parameters(), self.grad_clip)
        self.optimizer.step()
        self.updates += 1
        if self.updates % self.target_update == 0:
            self.update_target()

        q_taken = q.detach().float().gather(1, actions.unsqueeze(1)).squeeze(1)
        scalars = torch.stack(
            [loss.detach(), q_taken.mean(), td_abs.mean(), grad_norm.detach().float()]
        )
        host = torch.cat([td_abs, scalars]).float().cpu().numpy()  # the one sync
        b = int(actions.shape[0])
        return {
            "loss": float(host[b]),
            "q_mean": float(host[b + 1]),
            "td_abs_mean": float(host[b + 2]),
            "grad_norm": float(host[b + 3]),
            "updates": self.updates,
            "priorities": host[:b].astype(np.float32, copy=True),
        }

    def is_finite(self) -> bool:
        """True when every online and target parameter is finite."""
        with torch.no_grad():
            return all(
                bool(torch.isfinite(p).all())
                for net in (self.online, self.target)
                for p in net.parameters()
            )

    def update_target(self) -> None:
        """Copy the online network's parameters into the target network (cast to its
        trunk's dtype: bfloat16 for a bfloat16 learner)."""
        self.target.load_state_dict(self.online.state_dict())

    # ---- weights and state ---------------------------------------------------
    def get_weights(self) -> dict[str, np.ndarray]:
        """The online network as CPU float32 numpy arrays (`weights_to_numpy`)."""
        return weights_to_numpy(self.online)

    def state_dict(self) -> dict[str, Any]:
        """``model``, ``target``, ``optimizer`` state dicts and ``updates`` (tensors
        and plain Python values only: loadable with ``torch.load(weights_only=True)``)."""
        return {
            "model": self.online.state_dict(),
            "target": {k: v.float() for k, v in self.target.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict` output or a whole checkpoint dict (whose
        ``counters["updates"]`` is used when ``updates`` is absent).

        The optimizer's moments come from the checkpoint, its hyperparameters
        (lr, eps, betas/alpha, fused...) from this run's config: torch's
        ``load_state_dict`` would bring back the saved ones, e.g. the RMSProp eps
        1.5e-7 of checkpoints written before it became sqrt(1.5e-7), an old
        ``--lr``, or ``fused`` of a CUDA run resumed on a CPU."""
        self.online.load_state_dict(state["model"])
        self.target.load_state_dict(state["target"])
        ours = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, ours, strict=True):
            group.update(hyper)
        updates = state.get("updates", state.get("counters", {}).get("updates", 0))
        self.updates = int(updates)


def _unit_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames -> float32 in [0, 1], once per batch (what `QNetwork` would do
    on each call); float input is passed through."""
    if frames.dtype == torch.uint8:
        return frames.float().div_(255.0)
    return frames


_TORCH_DTYPES: dict[np.dtype, torch.dtype] = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float32): torch.float32,
}
