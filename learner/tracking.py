"""Experiment tracking (``--track wandb``): the run's TensorBoard scalars, its
evaluations and its summary synced to Weights & Biases, the way CleanRL's
``--track`` and Stable-Baselines3's ``sync_tensorboard`` do it. All wandb code
lives here; wandb is the optional extra ``pip install 'apex-dqn[wandb]'``.

How the driver (`deploy.launcher`) uses it:
  1. `require(cfg)` before anything starts (the CLI calls it before ``--check``
     too): ``--track wandb`` without wandb installed is a `TrackingError` that
     names the pip command.
  2. `start(cfg, logdir)` before `learner.metrics.Metrics` opens its
     SummaryWriter: ``wandb.tensorboard.patch(root_logdir=LOGDIR/tb)``, then
     ``wandb.init``. Every scalar the writer logs from then on reaches the W&B
     run's history, with TensorBoard's step (env frames) as ``global_step``:
     the training metrics and, because `learner.evaluator` writes each
     evaluation to TensorBoard, ``eval_return_mean``, ``eval_return_median``,
     ``eval_human_normalized``, ... The run's config is `Config.to_dict()` (the
     Redis password redacted); its name is the logdir's.
  3. `Tracker.finish(summary)` at the end: the summary's numbers and strings
     (best evaluation, evaluations, frames, updates, what faults cost) into the
     W&B run summary, ``LOGDIR/evals.jsonl`` saved with the run, then
     ``wandb.finish`` (exit code 1 when the run failed). Leaving the `start`
     context without it (an exception) finishes the W&B run with exit code 1.

Secrets: apex-dqn never reads ``WANDB_API_KEY``; wandb takes it from the
environment or from ``wandb login``'s netrc itself. Two wandb defaults would
copy secrets of ours into the run, so they are off: console capture (a terminal
may be shown the Ray dashboard's token) and system metadata (it records the
command line, where a ``--redis-url`` may hold a password). System metrics (CPU,
GPU, memory) stay on.

A resumed run (``--resume``) is a new W&B run with the same name: each
``train`` writes new TensorBoard event files, which are the ones synced.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common.config import Config, ConfigError

INSTALL_HINT = "pip install 'apex-dqn[wandb]'"
TB_SUBDIR = "tb"  # learner.metrics.Metrics writes LOGDIR/tb (deploy.launcher._run)
EVALS_FILE = "evals.jsonl"  # learner.evaluator.EVALS_FILE (not imported: it pulls in torch)


class TrackingError(ConfigError):
    """``--track`` cannot work as asked (wandb missing, or W&B refused to start);
    the message says what to do."""


def require(cfg: Config) -> None:
    """Raise `TrackingError` when ``cfg.run.track`` needs a package that is not
    installed. Imports wandb (about a second) only when it is asked for."""
    if cfg.run.track != "wandb":
        return
    try:
        import wandb  # noqa: F401
    except ImportError as exc:
        raise TrackingError(
            f"--track wandb needs the wandb package, which is not installed ({exc}); "
            f"install it with: {INSTALL_HINT} (or drop --track)"
        ) from None


class Tracker:
    """One W&B run (``run`` is None with ``--track none``: every method is then a
    no-op). Not thread-safe: the driver's thread only."""

    def __init__(self, run: Any = None, logdir: Path | None = None):
        self.run = run
        self.logdir = logdir
        self._finished = run is None

    def finish(self, summary: dict[str, Any], failed: bool = False) -> None:
        """Copy ``summary``'s scalar values (numbers, strings, booleans; lists such
        as the recent returns are left out) into the W&B run summary, save
        evals.jsonl with the run, and end it. Idempotent."""
        if self._finished:
            return
        self._finished = True
        import wandb

        try:
            self.run.summary.update(
                {
                    k: v
                    for k, v in summary.items()
                    if isinstance(v, (int, float, str, bool)) and not k.startswith("_")
                }
            )
            evals = self.logdir / EVALS_FILE if self.logdir is not None else None
            if evals is not None and evals.is_file():
                self.run.save(str(evals), base_path=str(self.logdir), policy="now")
        finally:
            self.run.finish(exit_code=1 if failed or summary.get("error") else 0)
            wandb.tensorboard.unpatch()


@contextmanager
def start(cfg: Config, logdir: Path, out: Callable[[str], None] = print) -> Iterator[Tracker]:
    """The W&B run of this training (a no-op `Tracker` with ``--track none``).

    Call before `learner.metrics.Metrics` is created: the TensorBoard writer is
    patched here, and only writers created afterwards are synced. Raises
    `TrackingError` when wandb is missing or ``wandb.init`` fails (no API key in
    online mode, an unknown entity, W&B unreachable)."""
    if cfg.run.track != "wandb":
        yield Tracker()
        return
    require(cfg)
    import wandb

    wandb_dir = os.environ.get("WANDB_DIR") or str(logdir)
    Path(wandb_dir).mkdir(parents=True, exist_ok=True)
    wandb.tensorboard.patch(root_logdir=str(logdir / TB_SUBDIR), pytorch=True)
    try:
        run = wandb.init(
            project=cfg.run.wandb_project,
            entity=cfg.run.wandb_entity or None,
            name=logdir.name,
            dir=wandb_dir,
            mode=cfg.run.wandb_mode or None,  # None: $WANDB_MODE, else online
            job_type="train",
            config=cfg.to_dict(),
            settings=wandb.Settings(console="off", x_disable_meta=True),
        )
    except Exception as exc:  # noqa: BLE001 - wandb raises many kinds; all mean "not started"
        wandb.tensorboard.unpatch()
        raise TrackingError(
            f"--track wandb: W&B did not start ({type(exc).__name__}: {exc}). Log in with "
            "'wandb login' or set WANDB_API_KEY in the environment, or train with "
            "--wandb-mode offline and upload later with 'wandb sync'"
        ) from None
    if run.offline:
        out(
            f"[apex] tracking: W&B run {run.name}, offline in {Path(run.dir).parent} "
            "('wandb sync DIR' uploads it)"
        )
    else:
        out(f"[apex] tracking: W&B run {run.name} -> {run.url}")
    tracker = Tracker(run, logdir)
    try:
        yield tracker
    except BaseException:
        tracker.finish({}, failed=True)
        raise
    tracker.finish({})  # a caller that did not finish it: end the run, no summary
