"""Training metrics: TensorBoard scalars and Ray gauges under one list of names.

`METRICS` is the single list of metric names (with descriptions) used by the
training loop, TensorBoard (tag = the name) and Ray (``ray.util.metrics.Gauge``
named ``apex_<name>``, exported by Ray as ``ray_apex_<name>``). Recording a name
not in the list is an error, so dashboards and code cannot drift apart.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log_ = logging.getLogger(__name__)

METRICS: dict[str, str] = {
    "episode_return": "raw (unclipped) score of a finished episode",
    "episode_length": "agent steps of a finished episode",
    "env_frames_per_s": "emulator frames per second, all actors together",
    "updates_per_s": "learner updates per second",
    "loss": "mean importance-weighted Huber loss",
    "q_mean": "mean Q(s, a) of the taken actions in the batch",
    "td_abs_mean": "mean |TD error| of the batch (new priorities)",
    "grad_norm": "gradient norm before clipping",
    "replay_size": "transitions stored in the replay, all shards",
    "samples_per_insert": "transitions sampled per transition inserted (replay ratio)",
    "data_wait_fraction": "fraction of learner wall time spent waiting for a batch",
    "weight_version": "version of the newest published weights",
    "epsilon_min": "smallest actor exploration rate",
    "epsilon_max": "largest actor exploration rate",
    "publish_latency_s": "seconds to copy and publish one weight version",
    "step_time_s": "mean seconds per learner update (compute, no data wait)",
    "checkpoint_s": "seconds to write the last checkpoint",
    "checkpoint_failures": "checkpoint, best.pt, video or evals.jsonl writes that failed "
    "(a full disk; the last good file is kept), this run",
    "beta": "importance-sampling exponent in use",
    "env_frames": "emulator frames so far, all actors (resumed runs included)",
    "updates": "learner updates so far",
    "episodes": "finished episodes so far",
    "replay_outages": "times a replay shard found its Redis unavailable (this run)",
    "replay_outage_s": "seconds replay shards' Redis was unavailable (this run, all shards)",
    "transitions_lost": "transitions lost (actor buffers overflowed during outages + "
    "writes Redis lost), this run",
    "orphan_frames_collected": "frames no transition referred to, deleted by the shards' sweep",
    "shard_restarts": "replay shard processes restarted (this run)",
    "actor_restarts": "actor processes restarted (this run)",
    "replay_rejected": "records the replay refused as invalid (this run)",
    "episode_return_mean": "mean raw return of the last 100 training episodes (epsilons mixed)",
    "replay_bytes": "bytes the replay uses in Redis, all shards",
    # evaluation during training (learner.evaluator): greedy play under the protocol
    "eval_return_mean": "mean raw score of the last evaluation (epsilon 0.001, no sticky actions)",
    "eval_return_median": "median raw score of the last evaluation",
    "eval_human_normalized": "human-normalized mean score of the last evaluation (1 = human)",
    "eval_weight_version": "weight version the last evaluation played",
    "eval_env_frames": "env frames of training when the last evaluated weights were taken",
}


class Metrics:
    """Writes each scalar to TensorBoard (when ``logdir``) and to a Ray gauge (when
    ``use_ray`` and Ray is initialised in this process). Not thread-safe.

    scalar(name, value, step):  one value (step: env frames, the x axis of every plot)
    record(values, step):       several; keys not in `METRICS` raise ValueError,
                                None / NaN values are skipped

    A TensorBoard file that cannot be written (a full disk: its writer thread dies
    with ENOSPC and every later write would raise it) never stops training: the
    writer is dropped with one warning, ``write_failures`` counts the lost writes,
    and a new event file is tried every ``REOPEN_S`` seconds.
    """

    REOPEN_S = 30.0

    def __init__(self, logdir: str | None, use_ray: bool = False):
        self.logdir = logdir
        self._writer: Any = None
        self.write_failures = 0
        self._reopen_at = 0.0
        self._open()
        self._use_ray = use_ray
        self._gauges: dict[str, Any] = {}

    def _open(self) -> None:
        if not self.logdir:
            return
        from torch.utils.tensorboard import SummaryWriter

        try:
            self._writer = SummaryWriter(log_dir=self.logdir, flush_secs=10)
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.write_failures += 1
        if self._writer is not None or self.write_failures == 1:
            log_.warning(
                "TensorBoard log %s not written (%s); training goes on, retrying every %g s",
                self.logdir,
                exc.strerror or exc,
                self.REOPEN_S,
            )
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - its thread died of the same error
                pass
        self._reopen_at = time.monotonic() + self.REOPEN_S

    def _tb(self, fn: Any) -> None:
        if self._writer is None and self.logdir and time.monotonic() >= self._reopen_at:
            self._open()
        if self._writer is None:
            return
        try:
            fn(self._writer)
        except OSError as exc:
            self._failed(exc)

    def scalar(self, name: str, value: float | int | None, step: int) -> None:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; add it to learner.metrics.METRICS")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self._tb(lambda w: w.add_scalar(name, float(value), global_step=int(step)))
        gauge = self._gauge(name)
        if gauge is not None:
            gauge.set(float(value))

    def record(self, values: dict[str, float | int | None], step: int) -> None:
        for name, value in values.items():
            self.scalar(name, value, step)

    def _gauge(self, name: str) -> Any:
        if not self._use_ray:
            return None
        if name in self._gauges:
            return self._gauges[name]
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Gauge

        gauge = Gauge(f"apex_{name}", description=METRICS[name])
        self._gauges[name] = gauge
        return gauge

    def flush(self) -> None:
        if self._writer is not None:
            self._tb(lambda w: w.flush())

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as exc:
                self._failed(exc)
            self._writer = None


def _si(x: float, digits: int = 2) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f}{unit}"
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def progress_line(s: dict[str, Any]) -> str:
    """One console line from a loop snapshot (missing keys are left out), e.g.
    ``frames 1.20M (3.40K frames/s) | updates 12.30K (19.1 updates/s) | replay 200.00K | return
    -20.1 (last 100 of 57) | eval 12.3 @ 4.1M frames | weights v42 | loss 0.0123 | wait 12% |
    eps 0.0002-0.4`` (``eval``: the last greedy evaluation and the env frames its weights
    were taken at)."""
    parts: list[str] = []
    if "env_frames" in s:
        fps = _si(s.get("env_frames_per_s", 0.0))
        parts.append(f"frames {_si(s['env_frames'])} ({fps} frames/s)")
    if "updates" in s:
        parts.append(f"updates {_si(s['updates'])} ({s.get('updates_per_s', 0.0):.1f} updates/s)")
    if "replay_size" in s:
        parts.append(f"replay {_si(s['replay_size'])}")
    if s.get("mean_return") is not None:
        parts.append(
            f"return {s['mean_return']:.1f} (last {s.get('recent_episodes', 0)} "
            f"of {s.get('episodes', 0)})"
        )
    if s.get("eval_return_mean") is not None:
        frames = _si(s.get("eval_env_frames", 0), digits=1)
        parts.append(f"eval {s['eval_return_mean']:.1f} @ {frames} frames")
    if "weight_version" in s:
        parts.append(f"weights v{s['weight_version']}")
    if s.get("loss") is not None:
        parts.append(f"loss {s['loss']:.4f}")
    if s.get("data_wait_fraction") is not None:
        parts.append(f"wait {100 * s['data_wait_fraction']:.0f}%")
    if s.get("epsilon_min") is not None and s.get("epsilon_max") is not None:
        parts.append(f"eps {s['epsilon_min']:.2g}-{s['epsilon_max']:.2g}")
    if s.get("replay_unavailable_s") is not None:
        parts.append(f"replay: unavailable {s['replay_unavailable_s']:.0f} s")
    return " | ".join(parts)
