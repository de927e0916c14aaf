"""deploy/start-redis.sh, run for real: the cluster's redis-server listens on the
given private address and loopback only, wants its password, refuses the replay's
user CONFIG, MODULE, FLUSHALL and the other dangerous commands, and every file it
keeps is 0600 in a 0700 directory, even files an older version left
world-readable; a supervisor restarts it after kill -9 and leaves it down after
SIGTERM; maxmemory with noeviction makes a full server refuse writes (~8 s)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "deploy" / "start-redis.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return next((a for a in out if "." in a and not a.startswith("127.")), None)


def run_script(state: Path, port: int, **env: str) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "APEX_STATE_DIR": str(state),
        "APEX_REDIS_PORT": str(port),
        **env,
    }
    return subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def state(tmp_path):
    state = tmp_path / "state"
    yield state
    pid = state / "redis.pid"
    if pid.exists():
        try:
            os.kill(int(pid.read_text()), 15)
        except (ProcessLookupError, ValueError):
            pass


def test_start_redis_is_private_and_tightens_old_files(state):
    port = free_port()
    state.mkdir(mode=0o755)
    # what an older start-redis.sh left: world-readable, listening everywhere
    (state / "redis-password").write_text("old-password-0123456789\n")
    (state / "redis.conf").write_text("bind 0.0.0.0\nprotected-mode no\n")
    for name in ("redis-password", "redis.conf"):
        (state / name).chmod(0o644)

    res = run_script(state, port, APEX_REDIS_HOST="127.0.0.1")
    assert res.returncode == 0, res.stderr
    conf = (state / "redis.conf").read_text()
    assert "protected-mode yes" in conf and "0.0.0.0" not in conf
    assert conf.splitlines()[0] == "bind 127.0.0.1"
    assert "old-password-0123456789" not in conf  # only its hash
    url = (state / "redis-url").read_text().strip()
    assert url == f"redis://apex:old-password-0123456789@127.0.0.1:{port}/0"  # kept

    with pytest.raises(redis.AuthenticationError):  # no password: refused
        redis.Redis(port=port).ping()
    client = redis.Redis.from_url(url)
    assert client.ping()
    client.set("apex:k", "v")
    for command in (
        ("CONFIG", "GET", "dir"),
        ("MODULE", "LIST"),
        ("DEBUG", "SLEEP", "0"),
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("SAVE",),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    client.close()
    admin_pw = (state / "redis-admin-password").read_text().strip()
    admin = redis.Redis(port=port, username="admin", password=admin_pw)
    assert admin.config_get("appendonly") == {"appendonly": "yes"}
    admin.close()

    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    assert {"redis.conf", "redis-password", "redis-admin-password", "redis-url", "redis.log"} <= {
        p.name for p in files
    }
    loose = {str(p.relative_to(state)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert all(m == "0o600" for m in loose.values()), loose

    again = run_script(state, port, APEX_REDIS_HOST="127.0.0.1")  # idempotent
    assert again.returncode == 0 and "already running" in again.stdout, again.stderr
    assert (state / "redis-url").read_text().strip() == url


def test_start_redis_binds_the_private_address_not_every_interface(state):
    addr = other_address()
    if addr is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    port = free_port()
    res = run_script(state, port)  # default: the first address of hostname -I
    assert res.returncode == 0, res.stderr
    conf = (state / "redis.conf").read_text()
    host = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()[0]
    assert conf.splitlines()[0] == f"bind {host} 127.0.0.1"
    url = (state / "redis-url").read_text().strip()
    assert f"@{host}:{port}/0" in url
    assert redis.Redis.from_url(url).ping()
    others = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True)
              .stdout.split() if "." in a and a != host]  # fmt: skip
    for other in others:  # listening on the private address only, not on 0.0.0.0
        with socket.socket() as s:
            s.settimeout(2)
            assert s.connect_ex((other, port)) != 0, f"redis answers on {other}"


def wait_for(condition, timeout: float, what: str):
    """Poll ``condition()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"not within {timeout:.0f} s: {what}")


def pid_of(path: Path) -> int | None:
    try:
        pid = int(path.read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def test_start_redis_is_supervised_and_bounded_in_memory(state):
    """kill -9 of the server: the supervisor brings it back on its AOF; a full
    server refuses writes with OOM (maxmemory + noeviction) instead of growing;
    SIGTERM stops it for good (~5 s)."""
    port = free_port()
    res = run_script(state, port, APEX_REDIS_HOST="127.0.0.1", APEX_REDIS_MAXMEMORY="16mb")
    assert res.returncode == 0, res.stderr
    assert "maxmemory 16777216 bytes" in res.stdout
    supervisor = pid_of(state / "redis-supervisor.pid")
    first = pid_of(state / "redis.pid")
    assert supervisor and first and supervisor != first
    url = (state / "redis-url").read_text().strip()
    admin_pw = (state / "redis-admin-password").read_text().strip()
    admin = redis.Redis(port=port, username="admin", password=admin_pw)
    assert admin.config_get("maxmemory") == {"maxmemory": str(16 << 20)}
    assert admin.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}

    client = redis.Redis.from_url(url)
    client.set("apex:kept", "before the kill")
    admin.bgrewriteaof()  # the key on disk, whatever appendfsync's timing
    wait_for(
        lambda: (
            admin.info("persistence")["aof_rewrite_in_progress"] == 0
            and admin.info("persistence")["aof_rewrite_scheduled"] == 0
        ),
        30,
        "the AOF rewrite",
    )
    os.kill(first, signal.SIGKILL)
    second = wait_for(
        lambda: (p := pid_of(state / "redis.pid")) not in (None, first) and p,
        30,
        "redis-server restarted by its supervisor after kill -9",
    )
    assert pid_of(state / "redis-supervisor.pid") == supervisor

    def answers():
        try:
            return client.get("apex:kept")
        except redis.ConnectionError:
            return None

    assert wait_for(answers, 30, "the restarted server answering") == b"before the kill"
    assert "exited 137: restarting it" in (state / "redis.log").read_text()

    with pytest.raises(redis.ResponseError, match="maxmemory"):  # OOM: refused, not grown
        for i in range(64):
            client.set(f"apex:fill:{i}", b"x" * (1 << 20))
    assert admin.info("memory")["used_memory"] <= (16 << 20) + (2 << 20)
    admin.close()
    client.close()

    os.kill(second, signal.SIGTERM)  # stopped on purpose: stays down
    wait_for(lambda: pid_of(state / "redis-supervisor.pid") is None, 30, "the supervisor's exit")
    assert pid_of(state / "redis.pid") is None
    assert "stopped on purpose (exit 0): not restarted" in (state / "redis.log").read_text()


@pytest.mark.parametrize("value", ["0", "5", "lots", "8tb"])
def test_start_redis_refuses_a_bad_memory_limit(state, value):
    res = run_script(state, free_port(), APEX_REDIS_HOST="127.0.0.1", APEX_REDIS_MAXMEMORY=value)
    assert res.returncode == 2
    assert f"APEX_REDIS_MAXMEMORY={value}: give a size of at least 8mb" in res.stderr
    assert not (state / "redis.pid").exists()
