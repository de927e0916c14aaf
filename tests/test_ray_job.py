"""`ray job submit` / `ray job stop` against a Ray head with token auth on, the
way docs/cluster.md tells a laptop to do it, and the head's metrics as
deploy/cluster.yaml starts them (marked ``slow``: ~1.5 min on 2 cores).

A head of its own (`ray start --head`, RAY_AUTH_MODE=token, a token file of this
test's own via RAY_AUTH_TOKEN_PATH, free ports, its own --temp-dir; nothing in
~/.ray is read or written, and no `ray stop`: teardown stops exactly the
processes whose command line names this test's directory, by pid):

- a client without RAY_AUTH_MODE=token is refused with HTTP 401, although the
  token is there to be read (RAY_AUTH_TOKEN_PATH): Ray's job CLI sends the token
  only in token mode;
- the head starts with RAY_PROMETHEUS_HOST pointing at the Prometheus that
  deploy/start-metrics.sh then starts (Debian's/Ubuntu's `prometheus`): the
  dashboard reports it healthy, and it scrapes the driver's `ray_apex_*` metrics
  from the node Ray lists in its service-discovery file;
- with the token mode set, `apex-dqn train` is submitted as a job (Catch, 2 actors), waited for
  until its log shows updates, then `ray job stop`ped: the job's runtime_env sets
  RAY_JOB_STOP_WAIT_TIME_S=180 (read by Ray's JobSupervisor on the head; the
  default 3 s SIGKILLs a driver that is still writing its checkpoint), so the
  driver's SIGTERM handler stops the run, writes the final checkpoint and the
  summary, and exits before Ray's SIGKILL.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request

import pytest
import torch

from tests.test_deploy import (
    RAY,
    REPO,
    free_port,
    port_open,
    proc_env,
    ray_procs,
    short_tmp,
    stop_ray,
    wait_for,
)

JOB_ID = "apex-job-test"
STOP_WAIT_S = 180  # RAY_JOB_STOP_WAIT_TIME_S: well above a final checkpoint's worst case
_SI = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def dashboard_get(dash: int, path: str, token: str) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{dash}/api/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:  # a failed health check is a 500 with a JSON body
        return json.loads(exc.read() or b"{}")


def job_api(dash: int, path: str, token: str) -> dict:
    return dashboard_get(dash, f"jobs/{path}", token)


def prom_query(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())["data"]["result"]


def updates_in(logs: str) -> float:
    """The highest `updates N` of the driver's progress lines (0 without one)."""
    best = 0.0
    for m in re.finditer(r"updates (\d+(?:\.\d+)?)([KMG]?) \(", logs):
        best = max(best, float(m.group(1)) * _SI[m.group(2)])
    return best


@pytest.mark.slow
def test_ray_job_submit_and_stop_with_token_auth():
    if not shutil.which("prometheus"):
        pytest.skip("prometheus is not installed: apt-get install prometheus (.ci/run installs it)")
    d = short_tmp("apxj")
    ray_tmp = d / "ray"
    token_file = d / "auth_token"
    token = secrets.token_hex(16)
    token_file.write_text(token)
    token_file.chmod(0o600)
    dash, prom = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"
    head_env = proc_env(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        RAY_PROMETHEUS_HOST=f"http://127.0.0.1:{prom}",
        RAY_GRAFANA_HOST=f"http://127.0.0.1:{free_port()}",  # no Grafana here: unused
    )
    client_env = dict(head_env)  # a laptop that did what docs/cluster.md says
    bare_env = dict(head_env)  # one that did not: RAY_AUTH_MODE unset
    bare_env.pop("RAY_AUTH_MODE")
    out: dict = {}

    def ray_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*RAY, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )

    try:
        start = ray_cli(
            "start", "--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
            f"--temp-dir={ray_tmp}", f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--object-store-memory=104857600", "--disable-usage-stats",
            env=head_env,
        )  # fmt: skip
        assert start.returncode == 0, f"ray start failed:\n{start.stdout}\n{start.stderr}"
        wait_for(lambda: port_open(dash), 60, "the dashboard (Jobs API)")
        metrics = subprocess.run(
            ["bash", str(REPO / "deploy" / "start-metrics.sh")],
            env={**head_env, "APEX_STATE_DIR": str(d / "state"), "RAY_TMP": str(ray_tmp),
                 "APEX_PROMETHEUS_PORT": str(prom)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert metrics.returncode == 0, f"start-metrics.sh failed:\n{metrics.stderr}"
        wait_for(
            lambda: dashboard_get(dash, "prometheus_health", token).get("result"),
            60, "the dashboard to find Prometheus at RAY_PROMETHEUS_HOST",
        )  # fmt: skip

        refused = ray_cli(
            "job", "submit", "--address", address, "--no-wait", "--", "true", env=bare_env
        )
        out["refused"] = refused

        run = d / "run"
        summary = d / "summary.json"
        entrypoint = [  # `ray job submit -- ARGS` quotes each of ARGS for the head's sh
            sys.executable, "-m", "deploy.cli", "train", "--ray-address", "auto",
            "--env", "ApexCatch-v0", "--actors", "2", "--envs-per-actor", "2",
            "--min-replay", "200", "--batch-size", "32", "--capacity", "20000",
            "--publish-seconds", "1", "--log-every", "2", "--loader-workers", "1",
            "--eval-every-minutes", "0", "--max-seconds", "400",  # a backstop: stop ends it
            "--logdir", str(run), "--summary-json", str(summary),
        ]  # fmt: skip
        runtime_env = {"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}}
        submit = ray_cli(
            "job", "submit", "--address", address, "--no-wait", "--submission-id", JOB_ID,
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint,
            env=client_env,
        )  # fmt: skip
        assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"

        def training() -> bool:
            status = job_api(dash, JOB_ID, token)["status"]
            logs = job_api(dash, f"{JOB_ID}/logs", token)["logs"]
            assert status in ("PENDING", "RUNNING"), f"the job ended: {status}\n{logs[-3000:]}"
            return updates_in(logs) > 0

        wait_for(training, 240, "the job's log to show updates", interval=2)
        wait_for(
            lambda: prom_query(prom, 'count({__name__=~"ray_apex_.+"})'), 90,
            "Prometheus to scrape the driver's ray_apex_* metrics", interval=2,
        )  # fmt: skip
        out["stop"] = ray_cli("job", "stop", "--address", address, JOB_ID, env=client_env,
                              timeout=STOP_WAIT_S + 60)  # fmt: skip
        out["info"] = job_api(dash, JOB_ID, token)
        out["logs"] = job_api(dash, f"{JOB_ID}/logs", token)["logs"]
        # the driver and its children (the embedded redis-server under the logdir)
        out["job_left"] = [f"{p.pid} {p.name()}" for p in ray_procs(run) if p.is_running()]
    finally:
        out["left"] = stop_ray(d)  # the head and anything the job left (its redis-server)
        summary_text = (d / "summary.json").read_text() if (d / "summary.json").exists() else None
        ckpt = d / "run" / "checkpoint.pt"
        state = torch.load(ckpt, weights_only=True) if ckpt.exists() else None
        shutil.rmtree(d, ignore_errors=True)

    refused = out["refused"]
    said = refused.stdout + refused.stderr
    # Ray's client turns the dashboard's HTTP 401 into an AuthenticationError
    assert refused.returncode != 0 and "Unauthorized: Missing authentication token" in said, (
        f"submit without the token mode:\n{said}"
    )

    stop, logs = out["stop"], out["logs"]
    assert stop.returncode == 0, f"ray job stop failed:\n{stop.stdout}\n{stop.stderr}"
    assert out["info"]["status"] == "STOPPED", out["info"]
    assert "[apex] SIGTERM: stopping" in logs, logs[-3000:]
    assert "[apex] stopped (stop requested)" in logs, logs[-3000:]
    assert summary_text is not None, f"no summary: the driver did not finish\n{logs[-3000:]}"
    s = json.loads(summary_text)
    assert s["stop_reason"] == "stop requested" and s["updates"] > 0, s
    assert s["checkpoint"] == str(ckpt) and state is not None, s
    assert state["updates"] == s["updates"], "the checkpoint is not the final one"
    assert not out["job_left"], f"the job's processes outlived `ray job stop`: {out['job_left']}"
    assert not out["left"], f"processes survived the teardown: {out['left']}"
