"""Training metrics: TensorBoard scalars and Ray metrics under one list of names.

`METRICS` is the single list of metric names (with descriptions) used by the
training loop, TensorBoard (tag = the name) and Ray (`ray.util.metrics`, under
the Prometheus name `prometheus_name` gives; Ray exports it with its ``ray_``
prefix). Recording a name not in the list is an error, so dashboards and code
cannot drift apart.

Prometheus names follow Prometheus' conventions: a running total (`COUNTERS`) is
a Ray ``Counter`` named ``apex_<name>_total``, every other name a ``Gauge``
named ``apex_<name>``; a name in seconds ends in ``_seconds`` (``_s`` and
``_per_s`` in the TensorBoard names become ``_seconds`` and ``_per_second``).
So ``env_frames`` is ``ray_apex_env_frames_total``, ``replay_outage_s`` is
``ray_apex_replay_outage_seconds_total`` and ``publish_latency_s`` is
``ray_apex_publish_latency_seconds`` in Prometheus.
"""

from __future__ import annotations

import logging
import math
import re
import threading
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

# Running totals: Prometheus counters (``ray_apex_<name>_total``). Each is exported
# as what this process added to it (see `Metrics.count_from`), never backwards.
COUNTERS: frozenset[str] = frozenset(
    {
        "env_frames",
        "updates",
        "episodes",
        "checkpoint_failures",
        "replay_outages",
        "replay_outage_s",
        "transitions_lost",
        "orphan_frames_collected",
        "shard_restarts",
        "actor_restarts",
        "replay_rejected",
    }
)


def _quiet_tensorboard_thread_oserrors() -> None:
    """TensorBoard writes its event file in a thread of its own, which dies of an
    OSError (a full disk) with a raw traceback on stderr. TensorBoard raises the
    same error again in the caller's next write, where `Metrics` says it in one
    line and goes on; so that thread's OSError is not printed. Other exceptions,
    and every other thread's, reach the hook that was installed before."""
    before = threading.excepthook
    if getattr(before, "apex_quiet_tensorboard", False):
        return

    def hook(args: Any) -> None:
        if (
            args.exc_type is not None
            and issubclass(args.exc_type, OSError)
            and type(args.thread).__module__.startswith("tensorboard.")
        ):
            return
        before(args)

    hook.apex_quiet_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def prometheus_name(name: str) -> str:
    """The name Ray registers for `name` (Prometheus shows it with Ray's ``ray_``
    prefix): ``env_frames`` -> ``apex_env_frames_total``, ``publish_latency_s`` ->
    ``apex_publish_latency_seconds``, ``updates_per_s`` -> ``apex_updates_per_second``."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; add it to learner.metrics.METRICS")
    base = re.sub(r"_s$", "_seconds", re.sub(r"_per_s$", "_per_second", name))
    return f"apex_{base}_total" if name in COUNTERS else f"apex_{base}"


class Metrics:
    """Writes each scalar to TensorBoard (when ``logdir``) and to a Ray metric (when
    ``use_ray`` and Ray is initialised in this process): a ``Gauge`` set to the
    value, or for a running total (`COUNTERS`) a ``Counter`` incremented by what
    the total grew since the last record. Not thread-safe.

    scalar(name, value, step):  one value (step: env frames, the x axis of every plot)
    record(values, step):       several; keys not in `METRICS` raise ValueError,
                                None / NaN values are skipped
    count_from(totals):         the totals this process starts from (a resumed
                                run's checkpoint counters); call before recording

    A Prometheus counter counts from 0 when its process starts, and Prometheus
    reads a lower value as a restart (``rate`` and ``increase`` rely on it). So a
    counter here counts only what this process added: a resumed run's counters
    start at 0, not at its checkpoint's totals (TensorBoard and the progress line
    keep the whole run's totals). A total that is recorded lower than before (an
    estimate such as transitions still in flight counted lost, then arriving) is
    not exported backwards: the counter holds until the total passes it again.

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
        self._gauges: dict[str, Any] = {}  # name -> Ray Gauge or Counter
        self._counted: dict[str, float] = {}  # counter name -> the total exported so far
        self._last: dict[str, float] = {}  # gauge name -> the value it was last set to

    def _open(self) -> None:
        if not self.logdir:
            return
        from torch.utils.tensorboard import SummaryWriter

        _quiet_tensorboard_thread_oserrors()

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
        metric = self._ray_metric(name)
        if metric is None:
            return
        if name not in COUNTERS:
            metric.set(float(value))
            self._last[name] = float(value)
            return
        grown = float(value) - self._counted[name]
        if grown > 0:
            metric.inc(grown)
            self._counted[name] = float(value)

    def count_from(self, totals: dict[str, float | int]) -> None:
        """Start the counters named in ``totals`` (`COUNTERS`) from these values: the
        totals a run had before this process (a resumed run's checkpoint counters)
        are not counted again. Call before the first record of those names."""
        for name, value in totals.items():
            if name not in COUNTERS:
                raise ValueError(f"{name!r} is not a running total (learner.metrics.COUNTERS)")
            if name in self._gauges:
                raise RuntimeError(f"count_from({name!r}) after it was recorded")
            self._counted[name] = float(value)

    def record(self, values: dict[str, float | int | None], step: int) -> None:
        for name, value in values.items():
            self.scalar(name, value, step)
        # Ray (OpenTelemetry underneath) exports a gauge only for a while after it
        # was set, so one set rarely (an evaluation's score, every few minutes)
        # would be a dot in Prometheus; every record sets each gauge's last value
        # again, so a gauge stays a line for as long as the run records anything
        for name, value in self._last.items():
            if name not in values:
                self._gauges[name].set(value)

    def _ray_metric(self, name: str) -> Any:
        if not self._use_ray:
            return None
        if name in self._gauges:
            return self._gauges[name]
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Counter, Gauge

        if name in COUNTERS:
            metric: Any = Counter(prometheus_name(name), description=METRICS[name])
            # exported from the start, at 0: a count that stays 0 (no restarts) is a
            # series that says so, not a missing one. Ray's public ``inc`` refuses 0.
            metric._record(0.0)
            self._counted.setdefault(name, 0.0)
        else:
            metric = Gauge(prometheus_name(name), description=METRICS[name])
        self._gauges[name] = metric
        return metric

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
