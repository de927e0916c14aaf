"""`apex-dqn plot`: TensorBoard logs of real runs' shape -> one PNG with the curves."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from deploy.cli import main as cli_main
from learner.metrics import Metrics
from learner.plot import EVAL_RETURN, TRAIN_RETURN, PlotError, draw, load_run, moving_average


def fake_run(logdir, returns, with_eval: bool) -> None:
    """TensorBoard scalars as the training loop writes them (step = env frames)."""
    m = Metrics(str(logdir / "tb"))
    for i, r in enumerate(returns):
        m.record({"episode_return": r, "episode_length": 100}, 1000 * (i + 1))
    for k in range(3):
        m.record({"updates_per_s": 10.0 + k, "env_frames_per_s": 900.0 + k}, 5000 * (k + 1))
    m.close()
    if with_eval:  # the periodic evaluation's tag (its own writer in the same dir)
        w = SummaryWriter(str(logdir / "tb"))
        for k, v in enumerate([-20.0, -15.0]):
            w.add_scalar(EVAL_RETURN, v, 4000 * (k + 1))
        w.close()


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_moving_average_is_trailing():
    np.testing.assert_allclose(moving_average(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])


def test_two_runs_overlaid_with_the_evaluation_curve_when_present(tmp_path):
    fake_run(tmp_path / "a", [-21.0, -20.0, -19.0, -18.0], with_eval=True)
    fake_run(tmp_path / "b", [-21.0, -21.0], with_eval=False)
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b", label="second")
    assert a.label == "a" and b.label == "second"
    assert a.series[TRAIN_RETURN].steps.tolist() == [1000, 2000, 3000, 4000]
    assert a.series[TRAIN_RETURN].values.tolist() == [-21.0, -20.0, -19.0, -18.0]
    assert a.series[EVAL_RETURN].values.tolist() == [-20.0, -15.0]
    assert EVAL_RETURN not in b.series
    minutes = a.series[TRAIN_RETURN].minutes
    assert (minutes >= 0).all() and (np.diff(minutes) >= 0).all() and minutes[-1] < 1.0

    fig = draw([a, b], smooth=2)
    ret_frames = fig.axes[0]
    lines = {line.get_label(): line for line in ret_frames.get_lines()}
    assert {"a training", "a evaluation", "second training"} <= set(lines)
    assert not any(k.startswith("second evaluation") for k in lines)
    ev = lines["a evaluation"]
    assert list(ev.get_xdata()) == [4000, 8000] and list(ev.get_ydata()) == [-20.0, -15.0]
    assert list(lines["a training"].get_ydata()) == [-21.0, -20.5, -19.5, -18.5]
    updates = {line.get_label(): list(line.get_ydata()) for line in fig.axes[2].get_lines()}
    assert updates["a"] == [10.0, 11.0, 12.0]

    out = tmp_path / "curves.png"
    assert cli_main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert png_size(out) == (880, 600) and out.stat().st_size < 150_000


def test_a_directory_without_logs_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli_main(["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "x.png")]) == 2
    assert "no TensorBoard logs in" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(PlotError, match="not a directory"):
        load_run(tmp_path / "missing")
