"""Evaluation during training with real Ray: the ``apex-eval`` actor on its own, and
a whole run through the CLI (real local Ray, embedded redis-server, ALE Pong, CPU
torch) that records evaluations, TensorBoard points, the summary and best.pt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from common.atari_scores import human_normalized
from common.config import Config
from learner.checkpoint import load_checkpoint
from learner.evaluator import EvalRequest, weights_digest

REPO = Path(__file__).resolve().parent.parent


def poll_until_done(backend, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = backend.poll()
        if record is not None:
            return record
        time.sleep(0.05)
    raise AssertionError("apex-eval did not answer")


def test_the_apex_eval_actor_plays_and_survives_kill_9(ray_local):
    """RayEvalBackend: a named 1-CPU actor, a non-blocking submit and poll, the record
    (and MP4 bytes) back over Ray. Then kill -9 of its process mid-evaluation: that
    evaluation fails (EvalFailed), Ray restarts the actor, the next one runs. ~20 s."""
    from deploy.evaluation import EVAL_NAME, RayEvalBackend
    from learner.evaluator import EvalFailed
    from learner.learner import Learner

    cfg = Config()
    cfg.env.env = "ApexCatch-v0"
    cfg.eval.eval_episodes = 6
    cfg.learner.learner_dtype = "float32"  # no start-up precision probe
    backend = RayEvalBackend(cfg, 3)
    try:
        assert backend.poll() is None  # nothing submitted
        weights = Learner(cfg, 3, "cpu").get_weights()
        request = EvalRequest(1, 7, 70, 700, 7.0, 6, 0, True)
        t0 = time.monotonic()
        backend.submit(request, weights)
        assert time.monotonic() - t0 < 1.0  # submit does not wait for the episodes
        assert ray_local.get_actor(EVAL_NAME) is not None
        record = poll_until_done(backend)
        assert {k: record[k] for k in asdict(request)} == asdict(request)
        assert len(record["scores"]) == 6 and record["weights_digest"] == weights_digest(weights)
        assert record["video_bytes"][4:8] == b"ftyp"  # an MP4 came back over Ray

        def actor_pid():
            return ray_local.get(
                backend.handle.__ray_call__.remote(lambda self: os.getpid()), timeout=10
            )

        pid = actor_pid()
        backend.submit(EvalRequest(2, 8, 0, 0, 0.0, 5000, 0, False), weights)  # ~45K steps
        time.sleep(0.5)  # let it start; that the kill hit it is checked below
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EvalFailed, match="Actor"):
            poll_until_done(backend)
        new_pid = None
        deadline = time.monotonic() + 60
        while new_pid is None and time.monotonic() < deadline:  # Ray restarts it
            try:
                new_pid = actor_pid()
            except ray_local.exceptions.RayError:
                time.sleep(0.2)
        assert new_pid is not None and new_pid != pid
        backend.submit(EvalRequest(3, 9, 0, 0, 0.0, 2, 0, False), weights)
        record = poll_until_done(backend)
        assert record["index"] == 3 and len(record["scores"]) == 2
    finally:
        backend.close()


def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}


@pytest.mark.e2e
def test_a_run_records_evaluations_and_keeps_the_best(tmp_path):
    """Train Pong until two evaluations are in evals.jsonl, then Ctrl-C. ~45 s."""
    logdir = tmp_path / "run"
    summary_path = tmp_path / "summary.json"
    argv = [
        *("train", "--env", "PongNoFrameskip-v4", "--actors", "1", "--envs-per-actor", "4"),
        *("--min-replay", "500", "--batch-size", "32", "--capacity", "20000", "--device", "cpu"),
        *("--loader-workers", "1", "--log-every", "3", "--max-seconds", "300"),
        *("--eval-every-minutes", "0.05", "--eval-episodes", "1", "--eval-video-every", "2"),
        *("--logdir", str(logdir), "--summary-json", str(summary_path)),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *argv],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    evals = logdir / "evals.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if evals.is_file() and len(evals.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)  # a clean stop: final checkpoint, summary
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-4000:]

    records = [json.loads(x) for x in evals.read_text().splitlines()]
    assert len(records) >= 2, out[-4000:]
    assert [r["index"] for r in records] == list(range(1, len(records) + 1))
    frames = [r["env_frames"] for r in records]
    assert frames == sorted(frames)
    for r in records:
        assert -21 <= r["eval_return_mean"] <= 21 and len(r["scores"]) == 1
        assert r["eval_human_normalized"] == pytest.approx(
            human_normalized("pong", r["eval_return_mean"])
        )
        assert r["env_id"] == "PongNoFrameskip-v4" and "sticky actions 0," in r["protocol"]

    summary = json.loads(summary_path.read_text())
    assert summary["evaluations"] == len(records)
    # Ctrl-C ends with the score of the final weights: the last record played them
    assert records[-1]["weight_version"] == summary["weight_version"], out[-3000:]
    assert "final evaluation of weights" in out
    assert summary["eval_return_mean"] == records[-1]["eval_return_mean"]
    best = max(records, key=lambda r: (r["eval_return_mean"], -r["index"]))
    assert summary["best_eval_return_mean"] == best["eval_return_mean"]

    # best.pt: the checkpoint of exactly the best evaluation's weights
    state = load_checkpoint(logdir / "best.pt", expect_env="PongNoFrameskip-v4")
    assert weights_digest(state["model"]) == best["weights_digest"]
    assert state["counters"]["weight_version"] == best["weight_version"]
    assert summary["best_checkpoint"] == str(logdir / "best.pt")

    # TensorBoard: a point per evaluation, at the env frames of its weights
    acc = EventAccumulator(str(logdir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("eval_return_mean")]
    assert tb == [(r["env_frames"], pytest.approx(r["eval_return_mean"])) for r in records]
    # the totals the dashboard's replay and fault panels plot are recorded too
    faults = ("replay_outages", "replay_outage_s", "transitions_lost", "orphan_frames_collected")
    assert set(faults) | {"replay_bytes", "actor_restarts"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("replay_bytes")[-1].value > 0
    assert all(acc.Scalars(name)[-1].value == 0 for name in ("replay_outages", "actor_restarts"))

    # the second evaluation wrote a video under LOGDIR/videos/
    assert records[1]["video"] and (logdir / records[1]["video"]).stat().st_size > 1000
    # the progress line shows the last evaluation
    assert " | eval " in out and " frames | weights v" in out, out[-3000:]


@pytest.mark.e2e
def test_sigterm_stops_without_a_final_evaluation(tmp_path):
    """A supervisor's SIGTERM (docker compose stop, ray job stop) waits only a grace
    period: the run writes its checkpoint and summary and exits 0 at once, without
    the final evaluation that a time limit or Ctrl-C gets."""
    logdir = tmp_path / "run"
    summary_path = tmp_path / "summary.json"
    argv = [
        *("train", "--env", "ApexCatch-v0", "--actors", "1", "--envs-per-actor", "4"),
        *("--min-replay", "500", "--batch-size", "32", "--capacity", "20000"),
        *("--loader-workers", "1", "--log-every", "1", "--max-seconds", "300"),
        *("--logdir", str(logdir), "--summary-json", str(summary_path)),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", *argv],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:  # until the learner is updating
        lines.append(line)
        if "| updates " in line and "| updates 0 " not in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    out = "".join(lines) + out
    assert proc.returncode == 0, out[-4000:]
    assert "SIGTERM: no final evaluation (the checkpoint is written)" in out
    assert "final evaluation of weights" not in out
    summary = json.loads(summary_path.read_text())
    assert summary["stop_reason"] == "stop requested" and summary["evaluations"] == 0
    assert load_checkpoint(summary["checkpoint"])["counters"]["updates"] == summary["updates"]
