"""deploy/start-redis.sh, run for real: the cluster's redis-server listens on the
given private address and loopback only, wants its password, refuses the replay's
user CONFIG, MODULE, FLUSHALL and the other dangerous commands, and every file it
keeps is 0600 in a 0700 directory, even files an older version left
world-readable (~2 s)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
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
