"""Evaluation during training: the policy's own score, measured while training goes on.

The training return mixes every actor's epsilon (0.4 down to ~0.0007), so it is
not the score of the policy being learned. Every ``--eval-every-minutes`` the
newest published weights are played for ``--eval-episodes`` whole episodes under
the published protocol (`common.evaluation.EvalProtocol.published`: no sticky
actions, up to 30 no-op starts, 108K-frame cap, epsilon 0.001) by a separate
`Evaluator`, which the launcher runs as the 1-CPU Ray actor ``apex-eval``
(`deploy.evaluation`). The learner never waits for it.

Two sides, both plain classes:

`Evaluator` (where the episodes are played; the Ray actor)
    ``evaluate(request, weights) -> record``: plays the episodes with
    `common.evaluation.EpisodeRunner` and returns a plain-dict record (scores,
    mean/median, human-normalized mean, a digest of the weights it played, and
    the MP4's bytes when the request asks for a video: the actor may run on
    another node than LOGDIR, so the driver writes the file).

`PeriodicEvaluation` (the driver's side, called from the training loop's thread)
    ``step(version, frames, updates, elapsed_s, snapshot)`` once per weight
    publish period: collects a finished evaluation (when there is one) and starts
    the next one when it is due and none is running. For each finished one:
      1. one JSON line in ``LOGDIR/evals.jsonl``;
      2. TensorBoard + Ray gauges: ``eval_return_mean``, ``eval_return_median``,
         ``eval_human_normalized``, ``eval_weight_version``, ``eval_env_frames``
         (step = the env frames at which the weights were taken);
      3. every ``eval_video_every``-th evaluation: ``LOGDIR/videos/eval-NNNN-...mp4``
         (the first episode); the newest ``keep_videos`` are kept;
      4. when its mean beats every earlier one: ``LOGDIR/best.pt``, the full
         checkpoint (model, target, optimizer, counters) of exactly the weights
         that were evaluated, with the record in ``counters["eval"]``.
    A file that cannot be written (a full disk) is skipped with a warning and
    counted (``write_failures``); the previous best.pt stays, the run goes on.
    ``final(...)`` scores the final weights when the run ends.
    ``latest()`` feeds the progress line (``eval 12.3 @ 4.1M frames``),
    ``summary()`` the run's summary JSON.

They meet through an `EvalBackend` (submit one request, poll without blocking):
`deploy.evaluation.RayEvalBackend` in training, `ThreadBackend` in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from common.config import Config
from common.evaluation import EpisodeRunner, EvalProtocol

log_ = logging.getLogger(__name__)

EVALS_FILE = "evals.jsonl"
BEST_FILE = "best.pt"
VIDEOS_DIR = "videos"
MAX_PARALLEL = 8


def weights_digest(weights: Mapping[str, np.ndarray | torch.Tensor]) -> str:
    """sha256 (hex) of a state dict's float32 values in key order: identifies the
    exact weights an evaluation played (and those a checkpoint's ``model`` holds)."""
    h = hashlib.sha256()
    for key in sorted(weights):
        value = weights[key]
        if isinstance(value, torch.Tensor):
            value = value.detach().to("cpu", torch.float32).numpy()
        h.update(key.encode())
        h.update(np.ascontiguousarray(value, dtype=np.float32).tobytes())
    return h.hexdigest()


@dataclass
class EvalRequest:
    """One evaluation to play (plain values: it travels to a Ray actor).

    index:          1-based evaluation number in this logdir (resumed runs go on)
    weight_version: the published version being played
    updates, env_frames, elapsed_s: the run's counters when the weights were taken
    episodes:       whole episodes to play
    seed:           env and epsilon seed (the same for every evaluation, so two
                    versions meet the same no-op starts)
    video:          return the first episode as MP4 bytes
    """

    index: int
    weight_version: int
    updates: int
    env_frames: int
    elapsed_s: float
    episodes: int
    seed: int
    video: bool


# `common.evaluation.EvalResult.to_dict` keys -> their names in a training run's
# evaluation records (evals.jsonl) and metrics (TensorBoard tags, Ray gauges)
TRAINING_NAMES = {
    "mean": "eval_return_mean",
    "median": "eval_return_median",
    "min": "eval_return_min",
    "max": "eval_return_max",
    "human_normalized": "eval_human_normalized",
}


class Evaluator:
    """Plays evaluation episodes of one game with the weights it is given.

    cfg:           the run's `Config` (env section, ``learner.dueling``, ``eval``)
    num_actions:   the network's action count
    parallel:      environments stepped together (at most ``eval_episodes``)
    torch_threads: set torch's CPU threads for this process (the Ray actor: 1, its
                   one CPU); None leaves them (in-process use next to a learner)
    nice:          raise this process's nice value by this much (the Ray actor: its
                   episodes take the CPU that the learner and the actors leave, so
                   on a 2-core machine evaluating does not starve the learner); 0
                   leaves it (in-process use: it would renice the caller)
    Not thread-safe; one `evaluate` at a time (a Ray actor runs calls in order).
    """

    def __init__(
        self,
        cfg: Config,
        num_actions: int,
        parallel: int = MAX_PARALLEL,
        torch_threads: int | None = None,
        nice: int = 0,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if nice > 0:
            os.nice(nice)
        self.protocol = EvalProtocol.published()
        self.runner = EpisodeRunner(
            cfg.env,
            num_actions,
            dueling=cfg.learner.dueling,
            network=cfg.network(),
            protocol=self.protocol,
            parallel=min(parallel, cfg.eval.eval_episodes),
            seed=cfg.run.seed,
        )

    def evaluate(self, request: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, Any]:
        """Play ``request`` (`EvalRequest` as a dict) with ``weights`` (float32
        numpy state dict); returns the record (see `PeriodicEvaluation`) with
        ``video_bytes`` (MP4, or None)."""
        import tempfile

        req = EvalRequest(**request)
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="apex-eval-") as tmp:
            result = self.runner.run(
                weights,
                req.episodes,
                seed=req.seed,
                video_dir=tmp if req.video else None,
                max_videos=1,
            )
            video = Path(result.videos[0]).read_bytes() if result.videos else None
        report = result.to_dict()  # the one record of an evaluation (`evaluate --json`)
        return {
            **asdict(req),
            "env_id": result.env_id,
            "protocol": self.protocol.describe(),
            "scores": report["scores"],
            "lengths": report["lengths"],
            "truncated": report["truncated"],
            # the training metrics' names (TensorBoard tags, evals.jsonl keys)
            **{name: report[key] for key, name in TRAINING_NAMES.items()},
            "weights_digest": weights_digest(weights),
            "eval_seconds": time.monotonic() - t0,
            "video_bytes": video,
        }

    def close(self) -> None:
        self.runner.close()


class EvalFailed(RuntimeError):
    """The evaluation in flight failed (its actor died, the env raised, ...)."""


class EvalBackend(Protocol):
    """Where evaluations run: at most one in flight.

    submit(request, weights): start one (only when `poll` said the last one is done)
    poll() -> record | None:  the finished record once, else None; never blocks;
                              raises `EvalFailed` when the evaluation failed
    close():                  stop; a running evaluation is abandoned
    """

    def submit(self, request: EvalRequest, weights: dict[str, np.ndarray]) -> None: ...

    def poll(self) -> dict[str, Any] | None: ...

    def close(self) -> None: ...


class ThreadBackend:
    """An `Evaluator` in a thread of this process (tests, ``train --in-process``)."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self._thread: threading.Thread | None = None
        self._out: dict[str, Any] = {}

    def submit(self, request: EvalRequest, weights: dict[str, np.ndarray]) -> None:
        def work() -> None:
            try:
                self._out["record"] = self.evaluator.evaluate(asdict(request), weights)
            except Exception as exc:  # noqa: BLE001 - surfaced by poll()
                self._out["error"] = exc

        self._out = {}
        self._thread = threading.Thread(target=work, name="apex-eval", daemon=True)
        self._thread.start()

    def poll(self) -> dict[str, Any] | None:
        if self._thread is None or self._thread.is_alive():
            return None
        self._thread = None
        if "error" in self._out:
            raise EvalFailed(f"{type(self._out['error']).__name__}: {self._out['error']}")
        return self._out["record"]

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=60)
        self.evaluator.close()


# (weights float32 numpy, learner state dict, counters) of the newest published version
Snapshot = tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]


class PeriodicEvaluation:
    """The driver's side (see the module docstring). Not thread-safe: one caller.

    cfg:        the run's `Config` (``eval`` section; the config saved in best.pt)
    logdir:     where evals.jsonl, videos/ and best.pt go
    backend:    an `EvalBackend`
    metrics:    `learner.metrics.Metrics` sink
    env_id, num_actions: stored in best.pt (as in every checkpoint)
    clock:      seconds, monotonic (tests pass their own)
    """

    def __init__(
        self,
        cfg: Config,
        logdir: str | os.PathLike,
        backend: EvalBackend,
        metrics: Any,
        env_id: str,
        num_actions: int,
        log: Callable[[str], None] = print,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.backend, self.metrics, self.log = cfg, backend, metrics, log
        self.env_id, self.num_actions, self.clock = env_id, num_actions, clock
        self.logdir = Path(logdir)
        self.every_s = 60.0 * cfg.eval.eval_every_minutes
        self.next_due = clock() + self.every_s
        self.records = _read_records(self.logdir / EVALS_FILE)  # a resumed logdir goes on
        self.best = max((r["eval_return_mean"] for r in self.records), default=None)
        self.failures = 0
        self.write_failures = 0  # best.pt, videos or evals.jsonl not written (full disk)
        self._pending: tuple[EvalRequest, dict[str, Any], dict[str, Any], float] | None = None
        self._warned_slow = False
        self._closed = False

    # ---- called by the training loop ------------------------------------------
    def step(
        self,
        version: int,
        frames: int,
        updates: int,
        elapsed_s: float,
        snapshot: Callable[[], Snapshot],
    ) -> None:
        """Collect a finished evaluation; start the next one when due and idle.
        ``snapshot()`` must return the weights of ``version`` (the newest
        published); it is called only when an evaluation starts."""
        self.collect()
        now = self.clock()
        if self._pending is not None or now < self.next_due:
            return
        weights, state, counters = snapshot()
        index = len(self.records) + 1
        k = self.cfg.eval.eval_video_every
        request = EvalRequest(
            index=index,
            weight_version=int(version),
            updates=int(updates),
            env_frames=int(frames),
            elapsed_s=float(elapsed_s),
            episodes=self.cfg.eval.eval_episodes,
            seed=self.cfg.run.seed + 1_000_003,  # apart from the actors' env seeds
            video=k > 0 and index % k == 0,
        )
        # the learner goes on updating its tensors in place: keep a copy for best.pt
        self._pending = (request, _cpu_copy(state), dict(counters), now)
        self.backend.submit(request, weights)
        self.next_due = now + self.every_s

    def collect(self) -> dict[str, Any] | None:
        """Take a finished evaluation's record (None while one runs or none does)."""
        if self._pending is None:
            return None
        request, state, counters, started = self._pending
        try:
            record = self.backend.poll()
        except EvalFailed as exc:
            self._pending = None
            self.failures += 1
            self.log(
                f"[apex] evaluation {request.index} failed ({exc}); the next one starts when due"
            )
            return None
        if record is None:
            waited = self.clock() - started
            if not self._warned_slow and waited > max(self.every_s, 600.0):
                self._warned_slow = True
                self.log(
                    f"[apex] evaluation {request.index} has run {waited / 60:.0f} min: apex-eval "
                    "needs one free CPU (--eval-every-minutes 0 turns evaluation off)"
                )
            return None
        self._pending = None
        self._absorb(record, state, counters)
        return record

    def latest(self) -> dict[str, Any]:
        """``eval_return_mean`` and ``eval_env_frames`` of the last evaluation ({} if none)."""
        if not self.records:
            return {}
        last = self.records[-1]
        return {"eval_return_mean": last["eval_return_mean"], "eval_env_frames": last["env_frames"]}

    def summary(self) -> dict[str, Any]:
        """For the run's summary JSON: the last and best mean, how many evaluations,
        best.pt when one was written, and the files that could not be written."""
        best_path = self.logdir / BEST_FILE
        return {
            "eval_return_mean": self.records[-1]["eval_return_mean"] if self.records else None,
            "best_eval_return_mean": self.best,
            "evaluations": len(self.records),
            "evaluation_failures": self.failures,
            "eval_write_failures": self.write_failures,
            "best_checkpoint": str(best_path) if best_path.is_file() else None,
        }

    def final(
        self,
        version: int,
        frames: int,
        updates: int,
        elapsed_s: float,
        snapshot: Callable[[], Snapshot],
        timeout: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> dict[str, Any] | None:
        """The run's last evaluation, of its final weights (``version``): waits for
        one in flight, then plays ``version`` unless the last record already did.
        Returns that record, or None when ``timeout`` seconds were not enough (the
        evaluation is dropped, and said so) or it failed."""
        deadline = self.clock() + timeout
        self._wait_pending(deadline, sleep)
        if self._pending is None and self.records and self.records[-1]["weight_version"] == version:
            return self.records[-1]
        if self._pending is None:
            self.log(
                f"[apex] final evaluation of weights v{version} ({self.cfg.eval.eval_episodes} "
                "episodes; Ctrl-C again to skip)"
            )
            self.next_due = self.clock()
            self.step(version, frames, updates, elapsed_s, snapshot)
            done = len(self.records)
            self._wait_pending(deadline, sleep)
            if len(self.records) > done:
                return self.records[-1]
        if self._pending is not None:
            self.log(f"[apex] final evaluation not done within {timeout:g} s: dropped")
            self._pending = None
        return None

    def _wait_pending(self, deadline: float, sleep: Callable[[float], None]) -> None:
        while self._pending is not None and self.clock() < deadline:
            self.collect()
            if self._pending is not None:
                sleep(0.2)

    def close(self) -> None:
        """Collect an evaluation that has just finished; abandon a running one.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.collect()
        if self._pending is not None:
            self.log(f"[apex] evaluation {self._pending[0].index} still running at stop: dropped")
            self._pending = None
        self.backend.close()

    # ---- one finished evaluation -------------------------------------------------
    def _prune_videos(self, directory: Path) -> None:
        """Keep the newest ``keep_videos`` evaluation MP4s (by evaluation index)."""
        videos = sorted(directory.glob("eval-*.mp4"))  # eval-NNNN-...: index order
        for old in videos[: max(0, len(videos) - self.cfg.eval.keep_videos)]:
            old.unlink(missing_ok=True)

    def _write_failed(self, what: str, exc: OSError) -> None:
        """A file of the evaluation could not be written (a full disk): an outage of
        that writer only. Said, counted (``write_failures``), and the run goes on."""
        self.write_failures += 1
        self.log(
            f"[apex] warning: {what} not written ({exc.strerror or exc}); the previous "
            f"files are kept, training goes on ({self.write_failures} failed so far)"
        )

    def _absorb(self, record: dict[str, Any], state: dict[str, Any], counters: dict) -> None:
        video = record.pop("video_bytes", None)
        record["video"] = None
        if video:
            path = (
                self.logdir
                / VIDEOS_DIR
                / (
                    f"eval-{record['index']:04d}-v{record['weight_version']}"
                    f"-frames{record['env_frames']}.mp4"
                )
            )
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(video)
                record["video"] = str(path.relative_to(self.logdir))
            except OSError as exc:
                self._write_failed(f"video {path.name}", exc)
                path.unlink(missing_ok=True)  # no half-written MP4
            self._prune_videos(path.parent)
        mean = record["eval_return_mean"]
        record["best"] = self.best is None or mean > self.best
        record["time"] = time.time()
        if record["best"]:
            from learner.checkpoint import save_checkpoint

            try:
                save_checkpoint(
                    self.logdir / BEST_FILE,
                    state,
                    {**counters, "eval": {k: v for k, v in record.items() if k != "best"}},
                    self.cfg.to_dict(),
                    self.env_id,
                    self.num_actions,
                )
                self.best = mean
            except OSError as exc:  # the previous best.pt stays; a later one may beat it
                record["best"] = False
                self._write_failed(BEST_FILE, exc)
        self.records.append(record)
        try:
            with open(self.logdir / EVALS_FILE, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        except OSError as exc:  # the record is still in memory, the progress line and TB
            self._write_failed(EVALS_FILE, exc)
        self.metrics.record(
            {
                "eval_return_mean": mean,
                "eval_return_median": record["eval_return_median"],
                "eval_human_normalized": record["eval_human_normalized"],
                "eval_weight_version": record["weight_version"],
                "eval_env_frames": record["env_frames"],
            },
            record["env_frames"],
        )
        self.metrics.flush()
        best = " (best so far: best.pt)" if record["best"] else ""
        self.log(
            f"[apex] eval {record['index']}: {mean:.1f} mean, {record['eval_return_median']:.1f} "
            f"median over {len(record['scores'])} episodes, weights v{record['weight_version']} "
            f"@ {record['env_frames']:,} frames, {record['eval_seconds']:.0f} s{best}"
        )


def _cpu_copy(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The evaluations an earlier run in this logdir recorded (unreadable lines skipped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log_.warning("%s: skipping an unreadable line", path)
            continue
        if isinstance(record, dict) and isinstance(record.get("eval_return_mean"), int | float):
            records.append(record)
    return records
