"""``apex-dqn train --in-process``: actor, replay shard and learner in one process,
without Ray, over a real embedded redis-server, real ALE and CPU torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from common.config import Config, ConfigError
from tests.test_train_e2e import cli, no_stray_processes

CATCH = (
    *("train", "--in-process", "--env", "ApexCatch-v0", "--actors", "1"),
    *("--envs-per-actor", "8", "--batch-size", "32", "--capacity", "20000"),
    *("--samples-per-insert", "4", "--target-update", "250", "--publish-seconds", "1"),
)


def ray_processes() -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [ln for ln in out.splitlines() if "raylet" in ln or "gcs_server" in ln]


@pytest.mark.e2e  # a whole CLI run, ~25 s: out of the fast tier's 5 minutes
def test_a_step_bound_run_without_ray(tmp_path):
    """100 updates: weights go from the learner to the actor and transitions from
    the actor through Redis to the learner, all in one process (no Ray started)."""
    ray_before = ray_processes()
    logdir = tmp_path / "catch"
    res = cli(
        *CATCH,
        *("--min-replay", "300", "--max-updates", "100", "--max-seconds", "300"),
        *("--eval-every-minutes", "0", "--log-every", "5"),
        *("--logdir", str(logdir), "--summary-json", str(tmp_path / "summary.json")),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[apex] in-process: actors, replay and learner in this process" in res.stdout
    assert "Ray dashboard" not in res.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stop_reason"] == "max_updates=100 reached" and summary["updates"] == 100
    assert summary["replay_inserted"] >= 300 and summary["replay_size"] > 0
    assert summary["frames"] > 0 and summary["episodes"] > 0
    assert min(summary["actor_weight_versions"]) >= 1  # the actor took published weights
    assert summary["transitions_lost"] == 0
    assert (logdir / "checkpoint.pt").is_file()
    assert ray_processes() == ray_before
    assert not no_stray_processes(logdir)


def test_in_process_and_a_ray_address_are_refused():
    cfg = Config()
    cfg.run.in_process, cfg.run.ray_address = True, "auto"
    with pytest.raises(ConfigError, match="--in-process and --ray-address"):
        cfg.validate()


@pytest.mark.e2e
def test_catch_learns_in_process(tmp_path):
    """The same learning bar as the Ray pipeline (tests/test_train_e2e.py): Catch
    to a mean >= 0.8 within 3,000 updates, here with the small torso."""
    logdir = tmp_path / "catch"
    res = cli(
        *CATCH,
        *("--network", "small", "--double", "--min-replay", "1000"),
        *("--max-updates", "3000", "--max-seconds", "400", "--eval-every-minutes", "0"),
        *("--logdir", str(logdir), "--summary-json", str(tmp_path / "summary.json")),
        timeout=460,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["updates"] == 3000
    ev = cli(
        *("evaluate", summary["checkpoint"], "--episodes", "100", "--epsilon", "0.01"),
        *("--json", str(tmp_path / "eval.json")),
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["mean"] >= 0.8, (scores["mean"], summary)


@pytest.mark.slow
def test_an_outage_longer_than_the_deadline_stops_the_run(tmp_path):
    """--max-outage-minutes: the replay's Redis is killed (SIGKILL) once the run
    learns, and stays down: the run stops with exit 1 and says why, instead of
    waiting forever."""
    import os
    import signal
    import time

    from replay_server.redis_proc import EmbeddedRedis

    server = EmbeddedRedis(str(tmp_path / "redis"))
    url_file = tmp_path / "url"
    url_file.write_text(server.url)
    url_file.chmod(0o600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logdir = tmp_path / "catch"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "deploy.cli", *CATCH,
            *("--redis-url-file", str(url_file), "--min-replay", "500"),
            *("--max-outage-minutes", "0.1", "--max-seconds", "300", "--log-every", "1"),
            *("--eval-every-minutes", "0", "--logdir", str(logdir)),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        for line in proc.stdout:  # wait for learning, not for a time
            if "updates " in line and " | updates 0 " not in line and "frames/s" in line:
                break
        os.kill(server.pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 1, err[-2000:]
    assert "unavailable for" in err and "longer than --max-outage-minutes 0.1" in err
    assert time.monotonic() - t0 < 120
