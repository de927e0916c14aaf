"""`docker compose up` for real: docker-compose.yml on a real Docker engine.

Marker ``docker``: part of the default suite wherever a Docker engine answers,
skipped (saying why) elsewhere; `.ci/run` installs and starts one. The images
come from deploy/local-images.sh (no registry needed) unless APEX_BASE_IMAGE and
REDIS_IMAGE are set in the environment, e.g. to python:3.11-slim-bookworm and
redis:7 where Docker Hub is reachable.

One compose project (`apextest<pid>`, profile `metrics`, its own image tags,
volumes and network, free dashboard and Prometheus ports, a random Redis
password in a secret file of its own (REDIS_PASSWORD_FILE), the developer's
`.env` ignored) runs through the tests below in order:

1. `up --build --scale ray-worker=2` with 2 actors (1 CPU per worker): updates
   grow in ray-head's log, the state API lists apex-actor-0/1 ALIVE on two
   different worker nodes (the head has --num-cpus=0) and the replay shards on
   the head, and the replay's keys are in the `redis` container;
2. every node's metrics endpoint serves `ray_apex_*`, the redis, ray-head and
   prometheus healthchecks pass, redis refuses a client without the password
   or with a wrong one, the password is at /run/secrets/redis_password in
   `redis` and `ray-head` only, the state API refuses a request without Ray's
   token (token auth is on by default) and answers one with it, no process in
   any container carries the password or the token in its argv, and `docker
   inspect` of every container (environment, command, labels, healthchecks,
   mounts: the whole JSON) holds neither;
3. Prometheus (built from Debian's package) scrapes every Ray node's :8080,
   answers a query for `ray_apex_updates*` through its published port and
   serves the Ape-X console page (deploy/prometheus/consoles/apex.html);
4. `docker-compose restart redis` mid-run: updates keep growing;
5. `docker-compose stop`: every container exits 0, ray-head's log ends with
   the summary naming the final checkpoint, that checkpoint loads and matches
   the summary, and no file of the run holds the password;
6. `up` again with --max-seconds 20: the run ends by itself, ray-head exits 0,
   the workers follow it and exit 0, redis keeps running.

Teardown removes the project's containers, volumes, network and image tags
(`down -v`, `rmi --no-prune`: the layers stay as build cache) and fails if any
of them is left. The base images deploy/local-images.sh tags
(apex-dqn-base:bookworm, apex-dqn-redis:bookworm) stay, like pulled images.

Runtime (2 shared cores): 5 min 42 s with the base images cached but no image
layers (build 126 s, up -> first update 26 s, the run that ends by itself
~2 min of it), ~50 s more for deploy/local-images.sh from nothing; 3 min 35 s
with every layer cached.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
WORKERS = 2
RUN_NAME = "compose-test"
RUN_DIR = f"/data/runs/{RUN_NAME}"
TRAIN_ARGS = (
    "--envs-per-actor 2 --min-replay 500 --batch-size 32 --capacity 20000 "
    "--publish-seconds 1 --log-every 5 --loader-workers 1 "
    # A backstop: a run this test lost track of ends by itself.
    "--max-seconds 1500"
)

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1800)]


# ---------------------------------------------------------------- helpers ---


def _compose_cli() -> list[str] | None:
    """Debian's docker-compose 1.29 if present, else the `docker compose` plugin."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            res = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
            if res.returncode == 0:
                return ["docker", "compose"]
    return None


def _engine_problem() -> str | None:
    """Why compose cannot run here, or None."""
    if not shutil.which("docker"):
        return (
            "no docker client: apt-get install docker.io (.ci/run installs it and starts dockerd)"
        )
    try:
        res = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "`docker info` did not answer within 30 s"
    if res.returncode != 0:
        return (
            "no Docker engine answers (`docker info`: "
            f"{(res.stderr or res.stdout).strip().splitlines()[-1:]}); start dockerd "
            "(.ci/run does)"
        )
    if _compose_cli() is None:
        return "neither docker-compose nor `docker compose` is installed: apt-get install docker-compose"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _si(text: str, unit: str) -> float:
    return float(text) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit]


def _progress_updates(log: str) -> list[float]:
    """Learner updates in every progress line of the driver's log, in order
    (`... | updates 12.30K (19.1 updates/s) | ...`, see learner.metrics.progress_line)."""
    return [_si(n, u) for n, u in re.findall(r"\| updates ([\d.]+)([KMG]?) \(", log)]


def _http_json(url: str, timeout: float = 5.0, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return json.loads(r.read())


def _wait_for(pred, timeout: float, what: str, interval: float = 2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _base_images() -> dict[str, str]:
    """APEX_BASE_IMAGE / REDIS_IMAGE (/ TORCH_WHEEL): from the environment, or
    built by deploy/local-images.sh (cached after its first run)."""
    keys = ("APEX_BASE_IMAGE", "REDIS_IMAGE", "TORCH_WHEEL")
    if os.environ.get("APEX_BASE_IMAGE") and os.environ.get("REDIS_IMAGE"):
        return {k: os.environ[k] for k in keys if os.environ.get(k)}
    res = subprocess.run(
        ["bash", "deploy/local-images.sh"], cwd=REPO, capture_output=True, text=True, timeout=1200
    )
    if res.returncode == 2:  # this machine lacks something; the message says what
        pytest.skip(
            f"deploy/local-images.sh cannot build the base images here: "
            f"{res.stderr.strip().splitlines()[-1]} (or set APEX_BASE_IMAGE and REDIS_IMAGE)"
        )
    assert res.returncode == 0, f"deploy/local-images.sh failed:\n{res.stderr[-4000:]}"
    found = dict(re.findall(r"^export (\w+)=(\S+)$", res.stdout, flags=re.M))
    assert {"APEX_BASE_IMAGE", "REDIS_IMAGE"} <= set(found), (
        f"deploy/local-images.sh printed no export lines for both images:\n{res.stdout}"
    )
    return found


class Stack:
    """One compose project of docker-compose.yml and what the tests saw of it."""

    def __init__(self, compose: list[str], images: dict[str, str], tmp: Path):
        self.project = f"apextest{os.getpid()}"
        self.image = f"apex-dqn-test-{os.getpid()}:cpu"
        self.prometheus_image = f"apex-dqn-test-{os.getpid()}:prometheus"
        self.password = secrets.token_urlsafe(18)
        self.token = secrets.token_hex(32)
        self.dash = _free_port()
        self.prom = _free_port()
        self.tmp = tmp
        self.timings: dict[str, float] = {}
        env_file = tmp / "empty.env"  # the developer's .env must not leak in
        env_file.write_text("")
        # As deploy/compose-secrets.sh leaves it: 0644 in a 0700 directory (mkdtemp's).
        secret_dir = tmp / "secrets"
        secret_dir.mkdir(mode=0o700)
        secret = secret_dir / "redis_password"
        secret.write_text(self.password + "\n")
        secret.chmod(0o644)
        token = secret_dir / "ray_auth_token"
        token.write_text(self.token + "\n")
        token.chmod(0o644)
        self.compose_argv = [*compose, "-p", self.project, "--env-file", str(env_file)]
        self.compose_argv += ["-f", str(COMPOSE_FILE), "--profile", "metrics"]
        settings = {
            "REDIS_PASSWORD_FILE": str(secret),
            "RAY_AUTH_TOKEN_FILE": str(token),
            "APEX_IMAGE": self.image,
            "PROMETHEUS_IMAGE": self.prometheus_image,
            "PROMETHEUS_PORT": str(self.prom),
            "APEX_ACTORS": str(WORKERS),
            "RAY_WORKER_CPUS": "1",
            "APEX_RUN_NAME": RUN_NAME,
            "APEX_TRAIN_ARGS": TRAIN_ARGS,
            "RAY_DASHBOARD_PORT": str(self.dash),
            **images,
        }
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("APEX_", "RAY_", "REDIS_", "TORCH_", "COMPOSE_"))
        }
        self.env.update(settings)

    # -- docker and compose ---------------------------------------------------
    def compose(self, *args: str, timeout: float = 300, check: bool = True):
        res = subprocess.run(
            [*self.compose_argv, *args], cwd=REPO, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check:
            assert res.returncode == 0, (
                f"{' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            )
        return res

    def containers(self, service: str | None = None) -> list[str]:
        argv = [
            "docker",
            "ps",
            "-aq",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
        ]
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
        return out.split()

    def inspect(self, cid: str) -> dict:
        out = subprocess.run(
            ["docker", "inspect", cid], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        return json.loads(out)[0]

    def head(self) -> str:
        (cid,) = self.containers("ray-head")
        return cid

    def logs(self, cid: str, since: str | None = None) -> str:
        argv = ["docker", "logs", *(["--since", since] if since else []), cid]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return res.stdout + res.stderr

    def head_running(self) -> bool:
        return self.inspect(self.head())["State"]["Running"]

    def updates(self, since: str | None = None) -> float:
        found = _progress_updates(self.logs(self.head(), since))
        return found[-1] if found else -1.0

    def wait_updates(self, above: float, timeout: float, since: str | None = None) -> float:
        def grown() -> float | None:
            if not self.head_running():
                raise AssertionError(
                    f"ray-head exited ({self.inspect(self.head())['State']['ExitCode']}) while "
                    f"waiting for updates > {above:.0f}:\n{self.logs(self.head())[-5000:]}"
                )
            n = self.updates(since)
            return n if n > above else None

        return _wait_for(grown, timeout, f"ray-head's log to show more than {above:.0f} updates")

    def exec(self, service: str, *cmd: str, env: dict[str, str] | None = None):
        (cid,) = self.containers(service)[:1]
        extra = [a for k, v in (env or {}).items() for a in ("-e", f"{k}={v}")]
        return subprocess.run(
            ["docker", "exec", *extra, cid, *cmd], capture_output=True, text=True, timeout=60
        )

    def ip(self, cid: str) -> str:
        nets = self.inspect(cid)["NetworkSettings"]["Networks"]
        return next(iter(nets.values()))["IPAddress"]

    def state(self, what: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.dash}/api/v0/{what}?limit=10000&detail=1"
        return _http_json(url, token=self.token)["data"]["result"]["result"]

    def redis_cli(self, *args: str, password: str | None = None):
        """redis-cli in the redis container, logged in as the replay's user `apex`
        with the secret file's password (or `password`; "" for none)."""
        auth = '"$(cat /run/secrets/redis_password)"' if password is None else shlex.quote(password)
        script = f"REDISCLI_AUTH={auth} redis-cli --user apex {shlex.join(args)}"
        return self.exec("redis", "sh", "-c", script)

    def redis_keys(self) -> int:
        res = self.redis_cli("dbsize")
        assert res.returncode == 0, f"redis-cli dbsize failed: {res.stdout}{res.stderr}"
        return int(res.stdout.strip())

    def bring_up(self, *flags: str) -> None:
        t0 = time.monotonic()
        self.compose(
            "up", "-d", "--build", *flags, "--scale", f"ray-worker={WORKERS}", timeout=1500
        )
        self.timings.setdefault("up_build_s", time.monotonic() - t0)
        t1 = time.monotonic()
        self.wait_updates(0, 300)
        self.timings.setdefault("up_to_first_update_s", time.monotonic() - t1)

    # -- cleanup ----------------------------------------------------------------
    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind, argv in (
            ("container", ["docker", "ps", "-aq", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "-q", "--filter", label]),
            ("network", ["docker", "network", "ls", "-q", "--filter", label]),
            ("image", ["docker", "images", "-q", self.image]),
            ("image", ["docker", "images", "-q", self.prometheus_image]),
        ):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
            found += [f"{kind} {x}" for x in out.split()]
        return found

    def remove(self) -> list[str]:
        with contextlib.suppress(Exception):
            self.compose(
                "down", "-v", "--remove-orphans", "--timeout", "30", timeout=300, check=False
            )
        subprocess.run(
            ["docker", "rmi", "--no-prune", self.image, self.prometheus_image],
            capture_output=True, timeout=120,
        )  # fmt: skip
        return self.leftovers()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    compose = _compose_cli()
    assert compose
    tmp = Path(tempfile.mkdtemp(prefix="apex-compose-"))
    t0 = time.monotonic()
    images = _base_images()
    s = Stack(compose, images, tmp)
    s.timings["base_images_s"] = time.monotonic() - t0
    try:
        s.bring_up()
        yield s
    finally:
        left = s.remove()
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"\n[compose test] timings: {json.dumps({k: round(v, 1) for k, v in s.timings.items()})}"
        )
    assert not left, f"the compose test left these behind: {left}"


# ------------------------------------------------------------------ tests ---


def test_compose_trains_with_actors_on_two_worker_nodes(stack: Stack):
    def actors_alive():
        rows = stack.state("actors")
        alive = {r["name"]: r for r in rows if r.get("name") and r["state"] == "ALIVE"}
        if {f"apex-actor-{i}" for i in range(WORKERS)} <= set(alive):
            return alive
        return None

    alive = _wait_for(actors_alive, 120, "apex-actor-0 and apex-actor-1 ALIVE in /api/v0/actors")
    nodes = {n["node_id"]: n for n in stack.state("nodes") if n["state"] == "ALIVE"}
    heads = {i for i, n in nodes.items() if n.get("is_head_node")}
    assert len(heads) == 1 and len(nodes) == 1 + WORKERS, f"nodes: {list(nodes.values())}"
    actor_nodes = [alive[f"apex-actor-{i}"]["node_id"] for i in range(WORKERS)]
    assert len(set(actor_nodes)) == WORKERS, f"the actors share a node: {actor_nodes}"
    assert not set(actor_nodes) & heads, "an actor runs on the head (it has --num-cpus=0)"
    replay = [r for name, r in alive.items() if name.startswith("apex-replay-")]
    assert replay and all(r["node_id"] in heads for r in replay), (
        f"replay shards must run on the head (the driver's node): {replay}"
    )
    # The driver uses compose's Redis (APEX_REDIS_URL), not an embedded server.
    assert stack.redis_keys() > 0, (
        "the redis container holds no keys: the driver did not use it (APEX_REDIS_URL)\n"
        + stack.logs(stack.head())[-3000:]
    )
    stack.wait_updates(stack.updates() + 5, 120)


def test_compose_metrics_healthchecks_and_password_only_in_the_secret(stack: Stack):
    def metrics() -> str | None:
        text = ""
        for cid in stack.containers("ray-head") + stack.containers("ray-worker"):
            with contextlib.suppress(OSError):
                url = f"http://{stack.ip(cid)}:8080/metrics"
                with urllib.request.urlopen(url, timeout=5) as r:
                    text += r.read().decode(errors="replace")
        names = set(re.findall(r"^ray_(apex_\w+)", text, flags=re.M))
        want = ("apex_updates", "apex_env_frames")
        return text if all(any(n.startswith(w) for n in names) for w in want) else None

    _wait_for(metrics, 90, "ray_apex_updates and ray_apex_env_frames on the nodes' :8080/metrics")

    def health(service: str) -> str:
        return stack.inspect(stack.containers(service)[0])["State"]["Health"]["Status"]

    for service in ("redis", "ray-head"):
        assert health(service) == "healthy", f"{service} is {health(service)}"
    _wait_for(lambda: health("prometheus") == "healthy", 120, "prometheus to be healthy")
    assert "PONG" in stack.redis_cli("ping").stdout
    memory = dict(
        line.split(":", 1)
        for line in stack.redis_cli("info", "memory").stdout.split()
        if ":" in line
    )
    assert int(memory["maxmemory"]) > 0 and memory["maxmemory_policy"] == "noeviction", memory
    assert "NOPERM" in stack.redis_cli("flushall").stdout  # the replay's user: no @dangerous
    for wrong in ("", "wrong"):
        res = stack.redis_cli("ping", password=wrong)
        assert "PONG" not in res.stdout, f"redis answers PING with password {wrong!r}"

    for service in ("redis", "ray-head", "ray-worker", "prometheus"):
        cid = stack.containers(service)[0]
        res = subprocess.run(
            ["docker", "exec", cid, "cat", "/run/secrets/redis_password"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if service in ("redis", "ray-head"):
            assert res.returncode == 0 and res.stdout.strip() == stack.password, (service, res)
        else:
            assert res.returncode != 0, f"{service} has the Redis secret mounted"

    # Ray's token auth is on by default: the state API refuses a request without it
    url = f"http://127.0.0.1:{stack.dash}/api/v0/actors?limit=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        _http_json(url)
    assert refused.value.code == 401, refused.value
    assert _http_json(url, token=stack.token)["data"]["result"]["result"] is not None

    for cid in stack.containers():
        top = subprocess.run(
            ["docker", "top", cid, "-eo", "pid,args"], capture_output=True, text=True, timeout=60
        ).stdout
        assert stack.password not in top, f"the password is in a process's argv:\n{top}"
        assert stack.token not in top, f"Ray's token is in a process's argv:\n{top}"
        info = subprocess.run(
            ["docker", "inspect", cid], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        assert stack.password not in info, (
            f"`docker inspect` of {stack.inspect(cid)['Name']} shows the Redis password"
        )
        assert stack.token not in info, (
            f"`docker inspect` of {stack.inspect(cid)['Name']} shows Ray's auth token"
        )


def test_compose_prometheus_scrapes_every_ray_node(stack: Stack):
    """Prometheus (the `metrics` profile, Debian's package) finds the Ray nodes
    through Ray's service-discovery file and scrapes our metrics from them."""
    base = f"http://127.0.0.1:{stack.prom}/api/v1"
    nodes = {stack.ip(c) for c in stack.containers("ray-head") + stack.containers("ray-worker")}
    t0 = time.monotonic()

    def all_up() -> dict | None:
        with contextlib.suppress(OSError, ValueError):
            targets = _http_json(f"{base}/targets")["data"]["activeTargets"]
            up = {
                t["labels"]["instance"].rsplit(":", 1)[0]
                for t in targets
                if t["labels"].get("job") == "ray"
                and t["labels"]["instance"].endswith(":8080")
                and t["health"] == "up"
            }
            return targets if nodes <= up else None
        return None

    _wait_for(all_up, 120, f"Prometheus to scrape :8080 on every Ray node {sorted(nodes)}")

    def apex_series() -> list | None:
        """The update counters and gauges, once one of them is above 0 (the
        counter is exported at 0 from the driver's start)."""
        with contextlib.suppress(OSError, ValueError):
            query = urllib.parse.quote('{__name__=~"ray_apex_updates.*"}')
            series = _http_json(f"{base}/query?query={query}")["data"]["result"]
            return series if any(float(s["value"][1]) > 0 for s in series) else None
        return None

    series = _wait_for(apex_series, 90, "ray_apex_updates* above 0 in Prometheus")
    assert {s["metric"]["__name__"] for s in series} >= {"ray_apex_updates_total"}, series
    # The Ape-X console page (deploy/prometheus/consoles) renders on the libraries
    # from Debian's package.
    url = f"http://127.0.0.1:{stack.prom}/consoles/apex.html"
    with urllib.request.urlopen(url, timeout=30) as r:
        page = r.read().decode(errors="replace")
    assert r.status == 200 and "Ape-X" in page and "PromConsole.Graph" in page, page[:2000]
    stack.timings["prometheus_all_nodes_up_s"] = time.monotonic() - t0


def test_compose_survives_redis_restart(stack: Stack):
    keys = stack.redis_keys()
    before = stack.updates()
    started = stack.inspect(stack.containers("redis")[0])["State"]["StartedAt"]
    t0 = time.monotonic()
    try:
        stack.compose("restart", "redis", timeout=120)
        restarted = stack.inspect(stack.containers("redis")[0])["State"]["StartedAt"]
        assert restarted != started, "docker-compose restart did not restart redis"
        since = str(int(time.time()))
        _wait_for(lambda: stack.redis_keys() > 0, 60, "redis to answer after its restart")
        after = stack.redis_keys()
        assert after >= keys * 0.5, f"the AOF lost the replay: {keys} keys before, {after} after"
        # Progress lines written after the restart must show more updates than
        # there were before it.
        stack.wait_updates(before + 20, 240, since=since)
        stack.timings["redis_restart_to_more_updates_s"] = time.monotonic() - t0
    finally:
        if not stack.head_running():
            # The driver died with its Redis, and the workers follow their
            # head: recreate the containers (volumes kept) so that the stop
            # test still checks a running stack.
            stack.timings["restored_after_failed_restart"] = 1
            stack.bring_up("--force-recreate")


def test_compose_stop_exits_zero_with_final_checkpoint(stack: Stack):
    from learner.checkpoint import load_checkpoint

    assert stack.head_running()
    t0 = time.monotonic()
    stack.compose("stop", timeout=400)
    stack.timings["stop_s"] = time.monotonic() - t0

    states = {}
    for cid in stack.containers():
        info = stack.inspect(cid)
        states[info["Name"].lstrip("/")] = (info["State"]["Status"], info["State"]["ExitCode"])
    assert len(states) == 3 + WORKERS, f"containers: {states}"  # redis, head, workers, prometheus
    bad = {n: s for n, s in states.items() if s != ("exited", 0)}
    assert not bad, f"containers that did not exit 0 on stop: {bad}\n" + "\n".join(
        f"--- {cid}\n{stack.logs(cid)[-2000:]}" for cid in stack.containers()
    )

    log = stack.logs(stack.head())
    done = re.findall(r"^\[apex\] done: (\{.*\})$", log, flags=re.M)
    assert done, f"no final summary in ray-head's log:\n{log[-4000:]}"
    summary = json.loads(done[-1])
    assert summary["checkpoint"] == f"{RUN_DIR}/checkpoint.pt", summary
    assert summary["stop_reason"] == "stop requested", summary
    assert summary["updates"] > 0 and summary["transitions"] > 0, summary

    out = stack.tmp / "run"
    res = subprocess.run(
        ["docker", "cp", f"{stack.head()}:{RUN_DIR}", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, f"docker cp of the run directory failed: {res.stderr}"
    ckpt = load_checkpoint(out / "checkpoint.pt", expect_env="ALE/Pong-v5")
    assert ckpt["counters"]["updates"] == summary["updates"], (ckpt["counters"], summary)
    secret = stack.password.encode()
    holding = [
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()
    ]
    assert not holding, f"files of the run hold the Redis password: {holding}"


def test_compose_run_that_ends_by_itself_exits_zero(stack: Stack):
    """A run that reaches its limit: the driver exits 0 with its summary, the
    workers follow their head (Ray gives up on a lost GCS after 60 s) and exit
    0 too; Redis keeps running with the replay."""
    stack.env["APEX_TRAIN_ARGS"] = TRAIN_ARGS.replace("--max-seconds 1500", "--max-seconds 20")
    t0 = time.monotonic()
    stack.compose("up", "-d", "--scale", f"ray-worker={WORKERS}", timeout=600)

    def exited(cid: str) -> dict | None:
        state = stack.inspect(cid)["State"]
        return None if state["Running"] or state["Status"] != "exited" else state

    head = _wait_for(
        lambda: exited(stack.head()), 400, "ray-head to end its run (--max-seconds 20)"
    )
    log = stack.logs(stack.head())
    assert head["ExitCode"] == 0, f"ray-head exited {head['ExitCode']}:\n{log[-4000:]}"
    done = re.findall(r"^\[apex\] done: (\{.*\})$", log, flags=re.M)
    assert done and json.loads(done[-1])["stop_reason"] == "max_seconds=20 reached", log[-3000:]
    for cid in stack.containers("ray-worker"):
        state = _wait_for(lambda cid=cid: exited(cid), 240, "a ray-worker to follow its head")
        wlog = stack.logs(cid)
        assert state["ExitCode"] == 0, f"a ray-worker exited {state['ExitCode']}:\n{wlog[-3000:]}"
        assert "the Ray head is gone" in wlog, wlog[-3000:]
    stack.timings["run_end_to_workers_exited_s"] = time.monotonic() - t0
    (redis,) = stack.containers("redis")
    assert stack.inspect(redis)["State"]["Running"], "redis should keep the replay running"
    assert stack.redis_keys() > 0
