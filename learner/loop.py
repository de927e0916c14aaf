"""The training loop of the learner role: sample -> update -> priorities -> publish.

`TrainLoop` only sees plain callables, so it runs the same in the tests (fed
in-process), in the driver wired to Ray actors and replay shards
(`deploy.launcher`), and with ``apex-dqn train --in-process`` (`deploy.inprocess`:
every role in one process, for pdb). Its two background threads (priority
updates, polls of the other roles) are in `learner.background`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from common.config import Config
from common.types import SampleBatch
from learner.background import Poller, PriorityWriter, RunStatus
from learner.checkpoint import save_checkpoint
from learner.learner import Learner
from learner.metrics import Metrics, progress_line

log_ = logging.getLogger(__name__)

RECENT_EPISODES = 100
# Fault counters from ``poll_external`` recorded as metrics (see `learner.metrics`).
_FAULT_METRICS = (
    "replay_outages",
    "replay_outage_s",
    "transitions_lost",
    "orphan_frames_collected",
    "shard_restarts",
    "actor_restarts",
    "replay_rejected",
)


class NonFiniteLoss(RuntimeError):
    """Training diverged (a NaN or infinite loss or weight); the message says where
    and names the last good checkpoint, which is never overwritten."""


class TrainLoop:
    """Runs the learner until told to stop; see `run` for the steps.

    cfg:               the run's `Config` (learner.publish_seconds,
                       learner.checkpoint_minutes, run.log_every, run.max_seconds,
                       run.max_frames, run.max_updates, replay.beta,
                       replay.beta_anneal_updates)
    learner:           the `Learner` (already restored when resuming)
    sample:            ``sample(beta) -> SampleBatch | None``; None = no batch yet
                       (replay below min_replay, rate-limited, timeout). Should block
                       at most about a second so that stop requests are seen.
    update_priorities: ``(keys int64[B], priorities float32[B]) -> None``; called
                       from a background thread (see `PriorityWriter`)
    publish:           ``(version, weights dict[str, float32 ndarray]) -> Any``; may
                       raise (logged, counted in ``publish_failures``; the next
                       period publishes again)
    poll_external:     ``() -> RunStatus``: the actors' and the replay's state
                       (`RunStatus`). Called from a background thread every
                       ``poll_seconds``; a call that raises keeps the last answer.
    metrics:           `Metrics` sink (the loop does not close it)
    checkpoint_path:   ``checkpoint.pt``, the newest checkpoint, written every
                       ``checkpoint_minutes`` and at exit (atomic; the newest
                       ``keep_checkpoints`` stay as ``checkpoint-<updates>.pt``)
    counters:          the ``counters`` of a resumed checkpoint: frames,
                       transitions, episodes, weight_version, elapsed_s and
                       recent_returns continue from there
    log:               console sink for the progress line (default print)
    env_id:            canonical game id stored in checkpoints (default: resolved
                       from ``cfg.env``)
    evaluation:        optional `learner.evaluator.PeriodicEvaluation`, stepped
                       after each publish period with the newest published
                       weights (it never blocks on an evaluation)
    """

    def __init__(
        self,
        cfg: Config,
        learner: Learner,
        sample: Callable[[float], SampleBatch | None],
        update_priorities: Callable[[np.ndarray, np.ndarray], None],
        publish: Callable[[int, dict], Any],
        poll_external: Callable[[], RunStatus],
        metrics: Metrics,
        checkpoint_path: str,
        counters: dict | None = None,
        log: Callable[[str], None] = print,
        env_id: str | None = None,
        poll_seconds: float = 1.0,
        metrics_seconds: float | None = None,
        evaluation: Any = None,
    ):
        self.cfg, self.learner = cfg, learner
        self.sample, self.publish = sample, publish
        self.metrics, self.checkpoint_path, self.log = metrics, checkpoint_path, log
        self.metrics_seconds = metrics_seconds or min(cfg.run.log_every, 5.0)
        if env_id is None:
            from common.env import resolve_env

            env_id = resolve_env(cfg.env.env, cfg.env).env_id
        self.env_id = env_id
        base = dict(counters or {})
        self.base_frames = int(base.get("frames", 0))
        self.base_transitions = int(base.get("transitions", 0))
        self.base_elapsed = float(base.get("elapsed_s", 0.0))
        self.episodes = int(base.get("episodes", 0))
        self.weight_version = int(base.get("weight_version", 0))
        self.recent: deque[float] = deque(
            (float(r) for r in base.get("recent_returns", [])), maxlen=RECENT_EPISODES
        )
        # Prometheus counters count what this process adds, not a resumed run's totals
        metrics.count_from(
            {"env_frames": self.base_frames, "updates": learner.updates, "episodes": self.episodes}
        )
        self.external = RunStatus()
        self.last_step: dict[str, Any] = {}
        self.published_at_update = learner.updates
        self.last_checkpoint: str | None = None
        self._last_rates: dict[str, float] = {}
        self.evaluation = evaluation
        self.elapsed = 0.0  # this run's seconds, set when `run` ends
        self.checkpoint_failures = 0  # checkpoint writes that failed (full disk, ...)
        self.publish_failures = 0  # weight publishes that failed (store restarting, ...)
        self._prio = PriorityWriter(update_priorities)
        self._poller = Poller(poll_external, poll_seconds)

    # ---- derived values -------------------------------------------------------
    @property
    def frames(self) -> int:
        """Env frames, resumed runs included."""
        return self.base_frames + int(self.external.frames)

    @property
    def transitions(self) -> int:
        return self.base_transitions + int(self.external.transitions)

    def beta(self) -> float:
        """Importance exponent: ``replay.beta`` -> 1 linearly over
        ``beta_anneal_updates`` learner updates (counted from the run's start,
        resumed updates included)."""
        b0, n = self.cfg.replay.beta, self.cfg.replay.beta_anneal_updates
        return b0 + (1.0 - b0) * min(1.0, self.learner.updates / n)

    def counters(self, elapsed: float) -> dict[str, Any]:
        """What a checkpoint stores to continue the counters (plain values only)."""
        return {
            "updates": self.learner.updates,
            "frames": self.frames,
            "transitions": self.transitions,
            "episodes": self.episodes,
            "weight_version": self.weight_version,
            "elapsed_s": self.base_elapsed + elapsed,
            "recent_returns": list(self.recent),
        }

    def mean_return(self) -> float | None:
        return float(np.mean(self.recent)) if self.recent else None

    # ---- the loop -------------------------------------------------------------
    def run(self, stop: threading.Event) -> dict[str, Any]:
        """Train until ``stop`` is set, ``run.max_seconds`` have passed in this run, or
        ``run.max_frames`` env frames or ``run.max_updates`` learner updates (resumed
        ones included) were reached.

        Each iteration, each block timed:
          1. absorb the newest ``poll_external`` answer (taken by a background
             thread): frame totals, finished episodes -> TensorBoard/Ray;
          2. stop check;
          3. ``sample(beta)`` — the time spent here is the data wait
             (``data_wait_fraction`` = wait / wall time of the metrics window);
          4. ``learner.step(batch)`` (``step_time_s``; the target network is copied
             inside `Learner` every ``target_update`` updates);
          5. new priorities queued to the background `PriorityWriter` (the next
             update does not wait; the writer applies them in order, and the
             loop waits only when its bounded queue is full);
          6. every ``publish_seconds``, when there were updates:
             ``publish(version + 1, weights)`` (``publish_latency_s``); then the
             evaluation, if any, collects a result or starts on these weights;
          7. every ``checkpoint_minutes``: atomic checkpoint (``checkpoint_s``);
          8. every ``metrics_seconds``: scalars; every ``log_every``: progress line.
        At exit (also on an exception): stop polling, flush the priority writer,
        publish the final weights as a new version (unless training diverged), write
        the final checkpoint, record the last metrics. `final_evaluation` then
        scores the final weights.
        Returns the summary: frames, transitions, updates, weight_version,
        episodes, mean_return / max_return (raw, last 100 episodes, None if
        none), frames_per_s, updates_per_s (this run), checkpoint (the newest good
        one's path; None when every write failed), stop_reason,
        data_wait_fraction (whole run), checkpoint_failures.
        """
        lc, rc = self.cfg.learner, self.cfg.run
        start = time.monotonic()
        self._poller.poll_now()
        self._absorb()
        start_frames, start_updates = self.frames, self.learner.updates
        self._prio.start()
        self._poller.start()
        win = _Window(start, self.frames, self.learner.updates, self._inserted())
        total_wait = 0.0
        next_publish = start + lc.publish_seconds
        next_ckpt = start + 60.0 * lc.checkpoint_minutes
        next_metrics = start + self.metrics_seconds
        next_log = start + rc.log_every
        reason = "error"
        diverged = False
        try:
            while True:
                self._absorb()
                now = time.monotonic()
                reason = self._stop_reason(stop, now - start)
                if reason:
                    break
                t0 = time.monotonic()
                batch = self.sample(self.beta())
                t1 = time.monotonic()
                if batch is None and t1 - t0 < 0.005:
                    stop.wait(0.01)  # a non-blocking sampler: do not spin
                    t1 = time.monotonic()
                win.wait += t1 - t0
                total_wait += t1 - t0
                if batch is not None:
                    out = self.learner.step(batch)
                    if not math.isfinite(out["loss"]):
                        raise NonFiniteLoss(self._diverged(f"the loss is {out['loss']}"))
                    t2 = time.monotonic()
                    win.step += t2 - t1
                    win.sampled += len(batch)
                    for k in _STEP_SCALARS:
                        win.sums[k] += out[k]
                    self._prio.put(batch.keys, out.pop("priorities"))
                    self.last_step = out
                now = time.monotonic()
                if now >= next_publish:
                    self._publish(win)
                    self._evaluate(now - start)
                    next_publish = now + lc.publish_seconds
                if now >= next_ckpt:
                    self._checkpoint(now - start)
                    next_ckpt = time.monotonic() + 60.0 * lc.checkpoint_minutes
                if now >= next_metrics:
                    self._record(win)
                    win = _Window(now, self.frames, self.learner.updates, self._inserted())
                    next_metrics = now + self.metrics_seconds
                if now >= next_log:
                    self.log(f"[apex] {progress_line(self.snapshot())}")
                    next_log = now + rc.log_every
        except NonFiniteLoss:
            diverged = True
            raise
        finally:
            self._poller.close()
            self._prio.close()
            self._poller.poll_now()
            self._absorb()
            elapsed = time.monotonic() - start
            self.elapsed = elapsed
            if not diverged:
                self._publish_final(win)
            path = self.last_checkpoint if diverged else self._checkpoint(elapsed)
            self._record(win)
            self.metrics.flush()
        elapsed = max(time.monotonic() - start, 1e-9)
        recent = list(self.recent)
        summary = {
            "frames": self.frames,
            "transitions": self.transitions,
            "updates": self.learner.updates,
            "weight_version": self.weight_version,
            "episodes": self.episodes,
            "mean_return": float(np.mean(recent)) if recent else None,
            "max_return": float(np.max(recent)) if recent else None,
            "frames_per_s": (self.frames - start_frames) / elapsed,
            "updates_per_s": (self.learner.updates - start_updates) / elapsed,
            "data_wait_fraction": total_wait / elapsed,
            "elapsed_s": elapsed,
            "checkpoint": path,
            "stop_reason": reason,
            "priority_update_failures": self._prio.failures,
            "checkpoint_failures": self.checkpoint_failures,
            "publish_failures": self.publish_failures,
        }
        self.log(f"[apex] stopped ({reason}): {progress_line(self.snapshot())}")
        return summary

    # ---- steps ----------------------------------------------------------------
    def _stop_reason(self, stop: threading.Event, elapsed: float) -> str:
        rc = self.cfg.run
        if stop.is_set():
            return "stop requested"
        if rc.max_seconds and elapsed >= rc.max_seconds:
            return f"max_seconds={rc.max_seconds:g} reached"
        if rc.max_frames and self.frames >= rc.max_frames:
            return f"max_frames={rc.max_frames} reached"
        if rc.max_updates and self.learner.updates >= rc.max_updates:
            return f"max_updates={rc.max_updates} reached"
        return ""

    def _absorb(self) -> None:
        status, episodes = self._poller.take()
        if status is not None:
            self.external = status
        for ret, length in episodes:
            self.episodes += 1
            self.recent.append(ret)
            self.metrics.record({"episode_return": ret, "episode_length": length}, self.frames)

    def _inserted(self) -> int:
        return int(self.external.replay_inserted)

    def _publish(self, win: _Window) -> None:
        """Publish the newest weights as the next version. A failing publish (the
        weight store died and is restarting, or does not answer within its
        deadline) is logged and counted (``publish_failures``); the actors keep
        the weights they have, and the next period publishes again."""
        if self.learner.updates == self.published_at_update:
            return  # nothing new to send
        t0 = time.monotonic()
        self.weight_version += 1
        try:
            self.publish(self.weight_version, self.learner.get_weights())
        except Exception as exc:  # noqa: BLE001 - the store's outage is not training's
            self.publish_failures += 1
            if self.publish_failures <= 3 or self.publish_failures % 100 == 0:
                self.log(
                    f"[apex] warning: weight publish v{self.weight_version} failed "
                    f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                    f"actors keep their weights, retrying every {self.cfg.learner.publish_seconds:g} s"
                )
            return
        win.publish_latency = time.monotonic() - t0
        self.published_at_update = self.learner.updates

    def _publish_final(self, win: _Window) -> None:
        """The final weights get their own version (what the final evaluation and
        the final checkpoint name); a failing publish only costs the actors them."""
        self._publish(win)

    def final_evaluation(self, timeout: float) -> dict[str, Any] | None:
        """After `run`: evaluate the final weights (`PeriodicEvaluation.final`), so a
        run that ends by its time or frame limit, or by Ctrl-C, has its final score.
        Call it once the actors have stopped (their CPU is the evaluator's then).
        Returns the record, or None (no evaluation configured, timed out, failed)."""
        if self.evaluation is None:
            return None
        elapsed = self.elapsed
        return self.evaluation.final(
            self.weight_version,
            self.frames,
            self.learner.updates,
            self.base_elapsed + elapsed,
            self._snapshot(elapsed),
            timeout=timeout,
        )

    def _snapshot(self, elapsed: float) -> Callable[[], tuple[dict, dict, dict]]:
        """What an evaluation takes when it starts: weights, learner state, counters."""
        return lambda: (
            self.learner.get_weights(),
            self.learner.state_dict(),
            self.counters(elapsed),
        )

    def _evaluate(self, elapsed: float) -> None:
        """Right after `_publish`: the learner's weights are those of ``weight_version``."""
        if self.evaluation is None:
            return
        self.evaluation.step(
            self.weight_version,
            self.frames,
            self.learner.updates,
            self.base_elapsed + elapsed,
            self._snapshot(elapsed),
        )

    def _checkpoint(self, elapsed: float) -> str | None:
        """Write a checkpoint, unless the network is no longer finite (then raise:
        the last good checkpoint must never be overwritten by a diverged one).

        A write that fails (a full disk, a read-only or vanished logdir) is an
        outage of the checkpoint writer, not of training: it is logged, counted
        (``checkpoint_failures``), the last good checkpoint stays, and training
        goes on; the next period tries again. Returns the newest good checkpoint
        (None when none was written yet)."""
        if not self.learner.is_finite():
            raise NonFiniteLoss(self._diverged("a network weight is not finite"))
        t0 = time.monotonic()
        try:
            save_checkpoint(
                self.checkpoint_path,
                self.learner.state_dict(),
                self.counters(elapsed),
                self.cfg.to_dict(),
                self.env_id,
                self.learner.num_actions,
                keep=self.cfg.learner.keep_checkpoints,
            )
        except OSError as exc:
            self.checkpoint_failures += 1
            self.log(
                f"[apex] warning: checkpoint not written ({exc.strerror or exc}); the last "
                f"good one ({self.last_checkpoint or 'none yet'}) is kept, training goes on "
                f"({self.checkpoint_failures} failed so far)"
            )
            self.metrics.scalar("checkpoint_failures", self.checkpoint_failures, self.frames)
            return self.last_checkpoint
        self.last_checkpoint = self.checkpoint_path
        self.metrics.scalar("checkpoint_s", time.monotonic() - t0, self.frames)
        return self.checkpoint_path

    def _diverged(self, what: str) -> str:
        last = self.last_checkpoint or "none was written in this run"
        return (
            f"training diverged at update {self.learner.updates}: {what}. The last good "
            f"checkpoint ({last}) is kept; resume from it with a lower --lr (now "
            f"{self.cfg.learning_rate():g}) or a smaller --grad-clip"
        )

    def snapshot(self) -> dict[str, Any]:
        """Current values for `progress_line` and the metrics."""
        ext = self.external
        return {
            "env_frames": self.frames,
            "updates": self.learner.updates,
            "replay_size": ext.replay_size,
            "mean_return": self.mean_return(),
            "recent_episodes": len(self.recent),
            "episodes": self.episodes,
            "weight_version": self.weight_version,
            "loss": self.last_step.get("loss"),
            "epsilon_min": ext.epsilon_min,
            "epsilon_max": ext.epsilon_max,
            "env_frames_per_s": self._last_rates.get("env_frames_per_s", 0.0),
            "updates_per_s": self._last_rates.get("updates_per_s", 0.0),
            "data_wait_fraction": self._last_rates.get("data_wait_fraction"),
            "replay_unavailable_s": ext.replay_unavailable_s,
            **(self.evaluation.latest() if self.evaluation is not None else {}),
        }

    def _record(self, win: _Window) -> None:
        now = time.monotonic()
        wall = max(now - win.start, 1e-9)
        updates = self.learner.updates - win.updates
        inserted = self._inserted() - win.inserted
        rates = {
            "env_frames_per_s": (self.frames - win.frames) / wall,
            "updates_per_s": updates / wall,
            "data_wait_fraction": min(1.0, win.wait / wall),
        }
        self._last_rates = rates
        values: dict[str, Any] = {
            **rates,
            "samples_per_insert": win.sampled / inserted if inserted > 0 else None,
            "step_time_s": win.step / updates if updates else None,
            "publish_latency_s": win.publish_latency,
            "weight_version": self.weight_version,
            "beta": self.beta(),
            "env_frames": self.frames,
            "updates": self.learner.updates,
            "episodes": self.episodes,
            "replay_size": self.external.replay_size,
            "epsilon_min": self.external.epsilon_min,
            "epsilon_max": self.external.epsilon_max,
            "episode_return_mean": self.mean_return(),
            "replay_bytes": self.external.replay_bytes,
            **{k: self.external.faults.get(k) for k in _FAULT_METRICS},
        }
        steps = self.learner.updates - win.updates
        if steps:
            for k in _STEP_SCALARS:
                values[k] = win.sums[k] / steps
        self.metrics.record(values, self.frames)


class _Window:
    """Accumulators of one metrics window."""

    def __init__(self, start: float, frames: int, updates: int, inserted: int):
        self.start, self.frames, self.updates, self.inserted = start, frames, updates, inserted
        self.wait = 0.0
        self.step = 0.0
        self.sampled = 0
        self.publish_latency: float | None = None
        self.sums = dict.fromkeys(_STEP_SCALARS, 0.0)


_STEP_SCALARS = ("loss", "q_mean", "td_abs_mean", "grad_norm")
