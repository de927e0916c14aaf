"""Metrics: TensorBoard event files hold the named scalars; Ray gauges and counters;
console line."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from learner.metrics import METRICS, Metrics, progress_line

REQUIRED = [
    "episode_return",
    "episode_length",
    "env_frames_per_s",
    "updates_per_s",
    "loss",
    "q_mean",
    "td_abs_mean",
    "replay_size",
    "samples_per_insert",
    "data_wait_fraction",
    "weight_version",
    "epsilon_min",
    "epsilon_max",
    "publish_latency_s",
    "env_frames",
    "updates",
]


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_holds_the_named_scalars(tmp_path) -> None:
    assert set(REQUIRED) <= set(METRICS)
    m = Metrics(str(tmp_path), use_ray=False)
    m.record({name: float(i) for i, name in enumerate(REQUIRED)}, step=100)
    m.scalar("loss", 0.25, step=200)
    m.scalar("q_mean", None, step=200)  # skipped
    m.scalar("q_mean", float("nan"), step=300)  # skipped
    with pytest.raises(ValueError, match="unknown metric 'lose'"):
        m.scalar("lose", 1.0, step=1)
    m.close()
    scalars = read_scalars(str(tmp_path))
    assert set(REQUIRED) <= set(scalars)
    assert scalars["loss"] == [(100, pytest.approx(4.0)), (200, pytest.approx(0.25))]
    assert scalars["q_mean"] == [(100, pytest.approx(5.0))]
    assert scalars["updates"] == [(100, pytest.approx(15.0))]


def test_without_logdir_or_ray_nothing_is_written(tmp_path) -> None:
    m = Metrics(None, use_ray=False)  # no TensorBoard dir, no Ray export: no sinks
    m.record({"loss": 1.0}, step=1)
    assert m._gauges == {}
    assert not list(tmp_path.iterdir())
    m.close()


def test_ray_metrics_under_prometheus_names(ray_local) -> None:
    """Gauges for values, counters for running totals (tests/test_dashboard.py reads
    them back from the node's Prometheus endpoint)."""
    from ray.util.metrics import Counter, Gauge

    m = Metrics(None, use_ray=True)
    m.record({"loss": 0.5, "updates_per_s": 12.0}, step=10)
    # a counter made without counting (Ray sums one name's counters in a process, and
    # tests/test_dashboard.py reads this process's totals back)
    m._ray_metric("env_frames")
    assert set(m._gauges) == {"loss", "updates_per_s", "env_frames"}
    assert m._gauges["loss"].info["name"] == "apex_loss"
    assert m._gauges["updates_per_s"].info["name"] == "apex_updates_per_second"
    assert isinstance(m._gauges["loss"], Gauge)
    assert isinstance(m._gauges["env_frames"], Counter)
    assert m._gauges["env_frames"].info["name"] == "apex_env_frames_total"
    with pytest.raises(RuntimeError, match="after it was recorded"):
        m.count_from({"env_frames": 100})
    m.close()


def test_count_from_takes_running_totals_only() -> None:
    m = Metrics(None, use_ray=False)
    with pytest.raises(ValueError, match="'loss' is not a running total"):
        m.count_from({"loss": 1.0})
    m.count_from({"env_frames": 1000, "updates": 10})
    m.close()


def test_progress_line() -> None:
    line = progress_line(
        {
            "env_frames": 1_234_567,
            "env_frames_per_s": 3400.0,
            "updates": 12_345,
            "updates_per_s": 19.14,
            "replay_size": 200_000,
            "mean_return": -20.06,
            "recent_episodes": 100,
            "episodes": 157,
            "weight_version": 42,
            "loss": 0.01234,
            "data_wait_fraction": 0.12,
            "epsilon_min": 0.0002,
            "epsilon_max": 0.4,
        }
    )
    assert line == (
        "frames 1.23M (3.40K frames/s) | updates 12.35K (19.1 updates/s) | replay 200.00K | "
        "return -20.1 (last 100 of 157) | weights v42 | loss 0.0123 | wait 12% | "
        "eps 0.0002-0.4"
    )
    assert progress_line({"updates": 0, "mean_return": None}) == "updates 0 (0.0 updates/s)"
    # the data source's outage, said once, while it lasts
    down = {"updates": 7, "updates_per_s": 0.0, "replay_unavailable_s": 12.4}
    assert progress_line(down) == "updates 7 (0.0 updates/s) | replay: unavailable 12 s"
    assert "replay" not in progress_line({**down, "replay_unavailable_s": None})
