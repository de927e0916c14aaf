"""Whole-pipeline runs through the CLI: real local Ray, embedded redis-server,
real ALE and CPU torch, each in its own process (as a user runs it)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def cli(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    """Run ``apex-dqn *argv`` in its own session. On ``timeout`` the whole process
    group (the driver, the Ray it started, its redis-server) is killed before the
    `subprocess.TimeoutExpired` (with the output so far) is raised: a hung run
    must not leave processes that later tests trip over."""
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
    }
    cmd = [sys.executable, "-m", "deploy.cli", *argv]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        print(stdout[-5000:])
        print(stderr[-5000:])
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr) from None
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if res.returncode != 0:
        print(res.stdout[-5000:])
        print(res.stderr[-5000:])
    return res


def no_stray_processes(logdir: Path) -> list[str]:
    """Processes still running that belong to this run (redis-server on its data dir, Ray)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(logdir) in line and "ps -eo" not in line]


def test_pong_60s_two_actors_then_evaluate(tmp_path):
    logdir = tmp_path / "pong"
    summary_path = tmp_path / "summary.json"
    res = cli(
        *("train", "--env", "PongNoFrameskip-v4", "--actors", "2", "--envs-per-actor", "4"),
        *("--max-seconds", "60", "--min-replay", "500", "--batch-size", "32"),
        *("--publish-seconds", "1", "--log-every", "5", "--capacity", "50000"),
        *("--logdir", str(logdir), "--summary-json", str(summary_path)),
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    for key in (
        "frames",
        "transitions",
        "updates",
        "weight_version",
        "episodes",
        "mean_return",
        "max_return",
        "frames_per_s",
        "updates_per_s",
        "checkpoint",
    ):
        assert key in summary
    assert summary["transitions"] > 1000
    assert summary["replay_size"] > 500  # transitions reached Redis and were indexed
    assert summary["updates"] > 10
    assert summary["weight_version"] >= 2
    # every actor picked up a published version beyond the initial one
    assert min(summary["actor_weight_versions"]) >= 1
    assert Path(summary["checkpoint"]).is_file()
    # progress lines at least every 10 s
    progress = [line for line in res.stdout.splitlines() if "frames/s" in line]
    assert len(progress) >= 5
    assert not no_stray_processes(logdir)
    # a healthy run loses nothing, also not for a moment: pushes in flight are not
    # losses (TensorBoard's series, like the Prometheus counter, saw every value)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(logdir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    lost = [e.value for e in tb.Scalars("transitions_lost")]
    assert lost and max(lost) == 0 and summary["transitions_lost"] == 0, lost

    videos = tmp_path / "videos"
    ev = cli(
        "evaluate",
        summary["checkpoint"],
        "--episodes",
        "1",
        "--video-dir",
        str(videos),
        "--json",
        str(tmp_path / "eval.json"),
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert len(scores["scores"]) == 1 and -21 <= scores["scores"][0] <= 21
    assert list(videos.glob("*.mp4"))


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU units that make bf16 autocast worth running."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.parametrize(
    ("network", "dtype"),
    [
        # the small torso learns Catch in tests/test_in_process.py (the same bar,
        # without Ray); a second distributed run for it cost CI 150 s
        ("nature", "float32"),
        pytest.param(
            "nature",
            "bfloat16",
            marks=pytest.mark.skipif(not cpu_has_bf16(), reason="no bf16 units on this CPU"),
        ),
    ],
)
def test_catch_learns_through_the_distributed_pipeline(tmp_path, network, dtype):
    """The whole pipeline (Ray actor -> Redis replay -> learner -> weights back)
    learns Catch: random play averages about -0.6, the trained agent >= 0.8; with
    the Nature torso, the learner's trunk in float32 and in bf16 autocast (float32
    output layers; where the CPU has bf16 units). The run ends with its final
    evaluation (10 greedy episodes of the final weights), the last line of
    evals.jsonl (the Nature run, ~5 minutes here, may also hold a periodic one)."""
    logdir = tmp_path / "catch"
    res = cli(
        *("train", "--env", "ApexCatch-v0", "--actors", "1", "--envs-per-actor", "8"),
        *("--learner-dtype", dtype, "--network", network, "--double"),
        # bound by work, not time: 3,000 updates (a single-process check learned it in ~2,000;
        # the Nature torso on one CPU thread takes ~300 s here). The seconds are a backstop for
        # a hung run, below the timeout so that a slow run fails on its stop reason instead
        *("--max-updates", "3000", "--max-seconds", "540"),
        *("--min-replay", "1000", "--batch-size", "32"),
        *("--target-update", "250", "--capacity", "20000", "--samples-per-insert", "4"),
        *("--loader-workers", "1", "--publish-seconds", "1", "--log-every", "10"),
        *("--logdir", str(logdir), "--summary-json", str(tmp_path / "summary.json")),
        timeout=660,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"learner: cpu, {dtype} (--learner-dtype {dtype})" in res.stdout
    assert "[apex] profile cpu (auto: no CUDA device)" in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates=3000 reached" and summary["updates"] == 3000
    # the final evaluation played the final weights
    evals = [json.loads(line) for line in (logdir / "evals.jsonl").read_text().splitlines()]
    assert evals[-1]["weight_version"] == summary["weight_version"]
    assert summary["eval_return_mean"] == evals[-1]["eval_return_mean"]
    assert len(evals[-1]["scores"]) == 10
    ev = cli(
        "evaluate",
        summary["checkpoint"],
        "--episodes",
        "100",
        "--epsilon",
        "0.01",
        "--json",
        str(tmp_path / "eval.json"),
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert len(scores["scores"]) == 100
    assert scores["mean"] >= 0.8, (scores["mean"], summary)
