"""Learner benchmark: updates/s fed from a real Redis replay vs the compute ceiling.

Prints ONE JSON object. In the same run, on the same device and network:

* ``updates_per_s_ceiling``: `Learner.update` on ONE pre-made batch already on the
  device (no data movement at all): what the device can do.
* ``updates_per_s_fed``: the training loop's hot path fed by the real replay:
  the launcher's `DataSource` (prioritized draws in this process; ``--loader-workers``
  loader processes fetch with one round trip of MGETs per shard and decode into shared batch
  slots) against a `ReplayShard` in an embedded
  redis-server holding ``--transitions`` real Pong transitions (random play,
  n=3), the learner copies each batch to the device and steps, and new priorities
  go back through the loop's background `PriorityWriter`.
The two are measured in alternating short phases (``--rounds``), so load from
other processes on a shared machine hits both alike.

* ``learner_ratio`` = fed / ceiling (1.0: the replay never holds the learner back).
* ``data_wait_fraction``: fraction of the fed phase's wall time spent in
  ``DataSource.sample`` (the loop's own definition).
* on CUDA also ``ceiling_512_updates_per_s`` (Ape-X's batch size).
* ``dtype``: the learner's precision (``--dtype``: auto, float32, bfloat16; see
  `learner.learner`: bfloat16 runs the trunk under autocast, the output layers and
  the loss stay float32) and ``dtype_reason``. With bfloat16, a float32 learner's
  ceiling is measured in the same alternating rounds
  (``ceiling_float32_updates_per_s``) and ``bf16_speedup`` = ceiling / that.

    python bench/learner.py --device cpu                 # batch 64, ~1 min on 2 cores
    python bench/learner.py --device cpu --dtype float32 --seconds 6
    python bench/learner.py --device cuda --seconds 20   # batch 512
    python bench/learner.py --steps --batch-size 32      # the CPU update, step by step

``--steps`` measures the cheaper CPU update one change at a time, each as the
update ceiling (one batch, no data movement) relative to ``before`` in the same
alternating rounds: ``before`` is the update as it was (Nature torso, Double DQN,
Adam without the fused kernel, uint8 frames converted to float inside each of
the three forward passes); then ``fused_adam``, ``convert_once`` (s' converted
once for the online and the target network), ``no_double`` and ``small_network``
(the CPU profile's torso), each adding to the one before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import Config  # noqa: E402
from learner.background import PriorityWriter  # noqa: E402
from learner.learner import Learner  # noqa: E402


def cpu_name() -> str:
    """The CPU model and its bf16 units (what decides whether bf16 autocast pays)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    model = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                  if ln.startswith("model name")), platform.processor())  # fmt: skip
    units = [u for u in ("avx512_bf16", "amx_bf16") if u in info]
    return f"{model} ({', '.join(units) or 'no bf16 units'})"


def fill_replay(url: str, transitions: int, codec: str, seed: int) -> tuple[object, float]:
    """A ReplayShard on ``url`` holding ``transitions`` real Pong transitions."""
    from bench.synthetic import SyntheticActor
    from replay_server.shard import ReplayShard
    from replay_server.writer import ReplayWriter

    t0 = time.perf_counter()
    shard = ReplayShard(url, capacity=transitions, codec=codec, seed=seed)
    writer = ReplayWriter(url, codec=codec)
    actor = SyntheticActor(writer.incarnation, game="pong", num_envs=8, seed=seed)
    try:
        while shard.size < transitions:
            fids, frames, batch = actor.push(25)
            writer.push(fids, frames, batch, actor=0, policy_version=0)
            shard.ingest()
    finally:
        actor.close()
        writer.close()
    return shard, time.perf_counter() - t0


class Ceiling:
    """Updates on one batch already on the device (no data movement at all)."""

    def __init__(self, learner: Learner, batch) -> None:
        self.learner, self.dev = learner, learner.to_device(batch)
        self.n, self.elapsed = 0, 0.0

    def run(self, seconds: float) -> None:
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            self.learner.update(self.dev)  # ends with a device->host copy: synchronised
            n += 1
        self.n, self.elapsed = self.n + n, self.elapsed + time.perf_counter() - t0

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


class Fed:
    """The loop's hot path: DataSource.sample -> Learner.step -> PriorityWriter."""

    def __init__(self, learner: Learner, sampler, loader) -> None:
        self.learner, self.loader = learner, loader
        self.writer = PriorityWriter(sampler.update_priorities)
        self.writer.start()
        self.n, self.elapsed, self.wait = 0, 0.0, 0.0

    def run(self, seconds: float) -> None:
        n, wait, t0 = 0, 0.0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            tw = time.perf_counter()
            b = self.loader.sample(0.4)
            wait += time.perf_counter() - tw
            if b is None:
                raise RuntimeError("the replay produced no batch within 60 s")
            self.writer.put(b.keys, self.learner.step(b)["priorities"])
            n += 1
        self.writer.flush()
        self.n, self.elapsed = self.n + n, self.elapsed + time.perf_counter() - t0
        self.wait += wait

    @property
    def rate(self) -> float:
        return self.n / self.elapsed


def measure(
    learner: Learner, sampler, loader, first, args, f32: Learner | None = None
) -> tuple[Ceiling, Fed, Ceiling | None]:
    """Warm them up, then alternate short ceiling and fed phases (``--rounds``) (and
    the float32 ceiling when ``f32`` is given), so that load from other processes
    on a shared machine hits them alike."""
    ceil, fed = Ceiling(learner, first), Fed(learner, sampler, loader)
    ceil32 = Ceiling(f32, first) if f32 is not None else None
    for _ in range(args.warmup):
        learner.update(ceil.dev)
        if ceil32 is not None:
            ceil32.learner.update(ceil32.dev)
        b = loader.sample(0.4)
        fed.writer.put(b.keys, learner.step(b)["priorities"])
    chunk = args.seconds / args.rounds
    try:
        for _ in range(args.rounds):
            ceil.run(chunk)
            fed.run(chunk)
            if ceil32 is not None:
                ceil32.run(chunk)
    finally:
        fed.writer.close()
    return ceil, fed, ceil32


def _legacy_update(learner: Learner, batch) -> None:
    """The update before the CPU work: each network call converts uint8 -> float."""
    from learner.losses import dqn_loss, td_targets

    q = learner.online(batch.obs)
    with torch.no_grad():
        target_next = learner.target(batch.next_obs)
        online_next = learner.online(batch.next_obs) if learner.double else target_next
    targets = td_targets(online_next, target_next, batch.returns, batch.discounts, learner.double)
    loss, td_abs = dqn_loss(q, batch.actions, targets, batch.weights)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(learner.online.parameters(), learner.grad_clip)
    learner.optimizer.step()
    td_abs.cpu().numpy()


def cpu_steps(args: argparse.Namespace) -> dict:
    """The ladder of ``--steps`` (see the module docstring): updates/s per step and
    each step's ratio to ``before``, measured in alternating rounds."""
    from learner.learner import ADAM_EPS

    batch_size = args.batch_size or 32
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)
    arrays = {
        "obs": rng.integers(0, 256, (batch_size, 4, 84, 84), dtype=np.uint8),
        "next_obs": rng.integers(0, 256, (batch_size, 4, 84, 84), dtype=np.uint8),
        "actions": rng.integers(0, 6, batch_size).astype(np.int64),
        "returns": rng.normal(size=batch_size).astype(np.float32),
        "discounts": np.full(batch_size, 0.99**3, np.float32),
        "weights": np.ones(batch_size, np.float32),
    }

    def make(network: str, double: bool, fused: bool) -> Learner:
        cfg = Config()
        cfg.learner.device = "cpu"
        cfg.learner.learner_dtype = "float32"
        cfg.learner.batch_size = batch_size
        cfg.learner.network, cfg.learner.double = network, double
        learner = Learner(cfg, num_actions=6, device="cpu")
        if not fused:
            learner.optimizer = torch.optim.Adam(
                learner.online.parameters(), lr=cfg.learning_rate(), eps=ADAM_EPS
            )
        return learner

    from learner.learner import DeviceBatch

    dev = DeviceBatch(**{k: torch.from_numpy(v) for k, v in arrays.items()})
    steps = {
        "before": (make("nature", True, False), _legacy_update),
        "fused_adam": (make("nature", True, True), _legacy_update),
        "convert_once": (make("nature", True, True), Learner.update),
        "no_double": (make("nature", False, True), Learner.update),
        "small_network": (make("small", False, True), Learner.update),
    }
    counts = dict.fromkeys(steps, 0)
    elapsed = dict.fromkeys(steps, 0.0)
    for learner, fn in steps.values():
        for _ in range(args.warmup):
            fn(learner, dev)
    chunk = args.seconds / args.rounds
    for _ in range(args.rounds):
        for name, (learner, fn) in steps.items():
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < chunk or n < 2:
                fn(learner, dev)
                n += 1
            counts[name] += n
            elapsed[name] += time.perf_counter() - t0
    rates = {k: counts[k] / elapsed[k] for k in steps}
    return {
        "bench": "learner-cpu-steps",
        "device_name": cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch_size": batch_size,
        "updates_per_s": {k: round(v, 2) for k, v in rates.items()},
        "ratio_to_before": {k: round(v / rates["before"], 3) for k, v in rates.items()},
        "updates_timed": counts,
        "seconds_per_step": args.seconds,
        "rounds": args.rounds,
        "baseline": "before: Nature torso, Double DQN, unfused Adam, uint8 -> float per forward",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch-size", type=int, default=0, help="0: 512 on cuda, 64 on cpu")
    ap.add_argument("--seconds", type=float, default=12.0, help="timed seconds per kind")
    ap.add_argument("--warmup", type=int, default=3, help="untimed updates of each kind")
    ap.add_argument("--rounds", type=int, default=4, help="alternations ceiling/fed")
    ap.add_argument("--transitions", type=int, default=20_000, help="replay fill")
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=4)
    ap.add_argument("--codec", default="lz4")
    ap.add_argument("--compile", action="store_true", help="torch.compile (cuda)")
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="learner threads; 0 = torch default"
    )
    ap.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="learner precision (--learner-dtype); bfloat16 also times a float32 ceiling",
    )
    ap.add_argument("--network", choices=["nature", "small"], default="nature")
    ap.add_argument("--no-double", action="store_true", help="plain DQN targets")
    ap.add_argument(
        "--steps", action="store_true", help="the CPU update one change at a time (no replay)"
    )
    args = ap.parse_args()
    if args.steps:
        print(json.dumps(cpu_steps(args)))
        return

    from replay_server.endpoints import endpoints, pair
    from replay_server.loader import DataSource
    from replay_server.redis_proc import EmbeddedRedis
    from replay_server.sampler import ReplaySampler

    cfg = Config()
    cfg.learner.device = args.device
    cfg.learner.compile = args.compile
    batch_size = args.batch_size or cfg.batch_size(args.device)
    cfg.learner.batch_size = batch_size
    cfg.learner.learner_dtype = args.dtype
    cfg.learner.torch_threads = args.torch_threads
    cfg.learner.network, cfg.learner.double = args.network, not args.no_double
    learner = Learner(cfg, num_actions=6, device=args.device)  # Pong: 6 actions
    f32 = None
    if learner.dtype == "bfloat16":
        cfg32 = Config.from_dict(cfg.to_dict())
        cfg32.learner.learner_dtype = "float32"
        f32 = Learner(cfg32, num_actions=6, device=args.device)

    with EmbeddedRedis(None, appendonly=False) as server:
        shard, fill_s = fill_replay(server.url, args.transitions, args.codec, seed=0)
        sampler = ReplaySampler(
            pair([shard], endpoints([server.url])), codec=args.codec, min_size=batch_size
        )
        first = sampler.sample(batch_size, 0.4)
        loader = DataSource(sampler, batch_size, args.loader_workers, args.prefetch, timeout=60)
        try:
            ceil, fed, ceil32 = measure(learner, sampler, loader, first, args, f32)
        finally:
            loader.close()
        ceil_512 = None
        if args.device == "cuda":
            if batch_size == 512:
                ceil_512 = ceil.rate
            else:
                big = Ceiling(learner, sampler.sample(512, 0.4))
                big.run(1.0)  # warm-up (cudnn autotuning for the new shape)
                big.n, big.elapsed = 0, 0.0
                big.run(args.seconds / 2)
                ceil_512 = big.rate
        replay_size = shard.size
        shard.stop()

    out = {
        "bench": "learner",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "batch_size": batch_size,
        "compile": args.compile,
        "network": args.network,
        "double": not args.no_double,
        "dtype": learner.dtype,
        "dtype_reason": learner.dtype_reason,
        "updates_per_s_fed": round(fed.rate, 3),
        "updates_per_s_ceiling": round(ceil.rate, 3),
        "learner_ratio": round(fed.rate / ceil.rate, 3),
        "data_wait_fraction": round(fed.wait / fed.elapsed, 3),
        "samples_per_s_fed": round(fed.rate * batch_size, 1),
        "updates_timed": {"ceiling": ceil.n, "fed": fed.n},
        "ceiling_512_updates_per_s": None if ceil_512 is None else round(ceil_512, 3),
        "ceiling_float32_updates_per_s": None if ceil32 is None else round(ceil32.rate, 3),
        "bf16_speedup": None if ceil32 is None else round(ceil.rate / ceil32.rate, 3),
        "replay_transitions": replay_size,
        "replay_fill_s": round(fill_s, 1),
        "loader_workers": args.loader_workers,
        "prefetch": args.prefetch,
        "codec": args.codec,
        "seconds_per_kind": args.seconds,
        "rounds": args.rounds,
        "baseline": "updates_per_s_ceiling: the same Learner.update on one batch already on the device",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
