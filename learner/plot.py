"""``apex-dqn plot``: training curves of one or more runs from their TensorBoard logs.

One PNG with four panels, the runs overlaid in one colour each:

1. episode return against env frames,
2. episode return against wall-clock minutes,
3. learner updates/s against wall-clock minutes,
4. env frames/s against wall-clock minutes.

Training returns (tag ``episode_return``, one point per finished episode) are
drawn as faint dots, with a moving average over ``smooth`` episodes on top. They are the
raw scores of every actor env, so they average over all the Ape-X epsilons (0.4
down to 0.4^8): they sit below what the greedy policy scores. Evaluation returns
(tag ``eval_return_mean``, written by periodic evaluation during training where a
run has it) are drawn dashed with markers in the same colour.

Wall-clock minutes count from the first event of the run's log (when the learner
opened it), pauses between resumed runs included. The x axis of frame plots is
the TensorBoard step, which `learner.metrics` sets to env frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TRAIN_RETURN = "episode_return"
EVAL_RETURN = "eval_return_mean"
UPDATES_PER_S = "updates_per_s"
FRAMES_PER_S = "env_frames_per_s"
TAGS = (TRAIN_RETURN, EVAL_RETURN, UPDATES_PER_S, FRAMES_PER_S)


class PlotError(ValueError):
    """A run directory without readable logs, or a bad argument; the message says which."""


@dataclass
class Series:
    """One scalar tag of a run: steps int64[n] (env frames), minutes float64[n]
    (wall clock since the log's first event), values float64[n]."""

    steps: np.ndarray
    minutes: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.values.shape[0])


@dataclass
class RunCurves:
    """The series of `TAGS` that a run's log holds (absent tags are missing keys)."""

    label: str
    path: Path
    series: dict[str, Series] = field(default_factory=dict)


def find_logs(run_dir: str | Path) -> Path:
    """The directory holding the run's event files: ``RUN_DIR/tb`` or RUN_DIR itself."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run} is not a directory; pass a run's --logdir (runs/<game>-<time>)")
    for d in (run / "tb", run):
        if d.is_dir() and any(d.glob("events.out.tfevents.*")):
            return d
    raise PlotError(
        f"no TensorBoard logs in {run} or {run / 'tb'} (no events.out.tfevents.* file); "
        "pass the --logdir of a training run"
    )


def load_run(run_dir: str | Path, label: str | None = None) -> RunCurves:
    """Read a run's TensorBoard scalars (all events, no sampling) into `RunCurves`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = find_logs(run_dir)
    acc = EventAccumulator(str(logs), size_guidance={"scalars": 0})
    acc.Reload()
    run = RunCurves(label=label or _default_label(Path(run_dir)), path=logs)
    try:
        start = acc.FirstEventTimestamp()
    except ValueError:
        raise PlotError(f"{logs}: the event files hold no events") from None
    have = set(acc.Tags().get("scalars", []))
    for tag in TAGS:
        if tag not in have:
            continue
        events = acc.Scalars(tag)
        run.series[tag] = Series(
            steps=np.array([e.step for e in events], np.int64),
            minutes=np.array([(e.wall_time - start) / 60.0 for e in events], np.float64),
            values=np.array([e.value for e in events], np.float64),
        )
    if not run.series:
        raise PlotError(f"{logs}: none of the tags {', '.join(TAGS)} were logged yet")
    return run


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start): float64[n]."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def draw(runs: Sequence[RunCurves], smooth: int = 100, title: str | None = None):
    """A matplotlib ``Figure`` with the four panels (no pyplot state is touched)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    fig = Figure(figsize=(11, 7.5), dpi=80, layout="constrained")
    axes = fig.subplots(2, 2)
    ret_frames, ret_min, upd, fps = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors, strict=True):
        train = run.series.get(TRAIN_RETURN)
        if train is not None and len(train):
            avg = moving_average(train.values, smooth)
            for ax, x in ((ret_frames, train.steps), (ret_min, train.minutes)):
                ax.scatter(x, train.values, color=color, alpha=0.15, s=2, linewidths=0)
                ax.plot(x, avg, color=color, linewidth=1.8, label=f"{run.label} training")
        ev = run.series.get(EVAL_RETURN)
        if ev is not None and len(ev):
            for ax, x in ((ret_frames, ev.steps), (ret_min, ev.minutes)):
                ax.plot(
                    x, ev.values, color=color, linestyle="--", marker="o", markersize=4,
                    linewidth=1.4, label=f"{run.label} evaluation",
                )  # fmt: skip
        for ax, tag in ((upd, UPDATES_PER_S), (fps, FRAMES_PER_S)):
            s = run.series.get(tag)
            if s is not None and len(s):
                ax.plot(s.minutes, s.values, color=color, linewidth=1.2, label=run.label)
    ret_frames.set_title(f"episode return (training: moving average of {smooth} episodes)")
    ret_frames.set_xlabel("env frames")
    ret_frames.xaxis.set_major_formatter(EngFormatter())
    ret_min.set_title("episode return against wall clock")
    upd.set_title("learner updates/s")
    fps.set_title("env frames/s")
    fps.yaxis.set_major_formatter(EngFormatter())
    for ax in (ret_frames, ret_min):
        ax.set_ylabel("raw score")
    for ax in (ret_min, upd, fps):
        ax.set_xlabel("wall-clock minutes")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    note = "training returns average over all actor envs' epsilons (Ape-X: 0.4 ... 0.4^8)"
    fig.suptitle(f"{title}\n{note}" if title else note, fontsize=10)
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path],
    output: str | Path,
    labels: Sequence[str] | None = None,
    smooth: int = 100,
    title: str | None = None,
) -> Path:
    """Load every run, draw them overlaid, write the PNG; returns its path."""
    if labels and len(labels) != len(run_dirs):
        raise PlotError(f"{len(labels)} --label for {len(run_dirs)} runs; give one per run or none")
    if smooth < 1:
        raise PlotError(f"smooth={smooth} must be >= 1")
    runs = [load_run(d, labels[i] if labels else None) for i, d in enumerate(run_dirs)]
    out = Path(output)
    if out.suffix.lower() != ".png":
        raise PlotError(f"{out}: the output is a PNG; name it *.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(runs, smooth=smooth, title=title).savefig(out, format="png")
    return out


def _default_label(run_dir: Path) -> str:
    name = run_dir.resolve().name
    return run_dir.resolve().parent.name if name == "tb" else name
