"""The embedded redis-server: never outlives its driver, locked down, supervised."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import redis

from replay_server.redis_proc import EmbeddedRedis, RedisSupervisor

SCRIPT = """
import sys, time
from replay_server.redis_proc import EmbeddedRedis
r = EmbeddedRedis(sys.argv[1])
print(r.pid, flush=True)
time.sleep(600)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses PR_SET_PDEATHSIG (Linux)")
def test_redis_server_stops_when_its_driver_is_killed(tmp_path):
    driver = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    redis_pid = int(driver.stdout.readline())
    assert alive(redis_pid)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 10
    while alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(redis_pid), "redis-server outlived its driver"


def test_clients_cannot_run_dangerous_commands_or_touch_other_keys(tmp_path):
    with EmbeddedRedis(str(tmp_path / "r")) as srv:
        client = redis.Redis.from_url(srv.url)
        client.set(b"apex:v2:x", b"1")  # its namespace: fine
        assert client.info("memory")["used_memory"] > 0  # memory figures: fine
        for command in (
            ("CONFIG", "SET", "dir", str(tmp_path)),
            ("SAVE",),
            ("MODULE", "LIST"),
            ("DEBUG", "SLEEP", "0"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("REPLICAOF", "NO", "ONE"),
            ("SHUTDOWN",),
            ("ACL", "LIST"),
        ):
            # NOPERM from the ACL (Redis >= 7 and Valkey refuse DEBUG and MODULE
            # for everybody by default, before the ACL is consulted)
            with pytest.raises(redis.ResponseError, match="permission|not allowed"):
                client.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.set(b"elsewhere", b"1")
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(host=srv.host, port=srv.port).ping()  # no password: refused
        assert redis.Redis.from_url(srv.admin_url).config_get("maxmemory-policy") == {
            "maxmemory-policy": "noeviction"
        }


def test_no_secret_on_disk_or_in_argv_and_private_files(tmp_path):
    data = tmp_path / "r"
    with EmbeddedRedis(str(data), maxmemory=64 << 20) as srv:
        client = redis.Redis.from_url(srv.url)
        client.set(b"apex:v2:x", b"1")
        argv = open(f"/proc/{srv.pid}/cmdline", "rb").read()
        assert srv.password.encode() not in argv
        assert int(client.info("memory")["maxmemory"]) == 64 << 20
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    assert files, "the server wrote no files"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
        assert srv.password.encode() not in path.read_bytes(), path


def test_bad_data_dir_is_refused_before_starting(tmp_path):
    with pytest.raises(ValueError, match="quote, backslash or line break"):
        EmbeddedRedis(str(tmp_path / 'a"\nsave 1 1'))


def test_supervisor_restarts_a_killed_server_with_its_data(tmp_path):
    srv = EmbeddedRedis(str(tmp_path / "r"))
    sup = RedisSupervisor([srv], period=0.1, log_fn=lambda _msg: None)
    try:
        client = redis.Redis.from_url(srv.url)
        client.set(b"apex:v2:kept", b"yes")
        first = srv.pid
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while (sup.restarts < 1 or not srv.alive) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.restarts == 1 and srv.alive and srv.pid != first
        assert client.get(b"apex:v2:kept") == b"yes"  # same port, password and AOF
    finally:
        sup.stop()
        srv.stop()


def test_the_start_deadline_scales_with_the_aof(tmp_path):
    """A large replay gets the time to load its AOF (20 s + its size at 50 MiB/s),
    instead of being killed half-loaded and started again forever."""
    with EmbeddedRedis(str(tmp_path / "redis")) as srv:
        base = srv.start_timeout()
        assert 20.0 <= base < 21.0  # an empty replay
        with open(os.path.join(srv.data_dir, "appendonlydir", "appendonly-big.aof"), "wb") as f:
            f.truncate(500 << 20)  # sparse: 500 MiB of apparent size, no disk used
        assert srv.start_timeout() == pytest.approx(base + 10.0, abs=0.1)


def test_a_replay_that_cannot_load_is_a_clear_error(tmp_path, capsys):
    """An AOF that redis-server refuses: `train` stops with exit 2 and says which
    shard and where, without a traceback."""
    from deploy.cli import main

    logdir = tmp_path / "run"
    aof = logdir / "redis" / "shard-0" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("not a manifest\n")
    code = main(["train", "--env", "ApexCatch-v0", "--logdir", str(logdir), "--max-updates", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the embedded replay of shard 0" in err and "did not start" in err
    assert "Traceback" not in err


def test_a_restart_never_sends_credentials_to_whoever_took_the_port(tmp_path):
    """After a crash another process may hold the server's TCP port. The restart
    fails there (the port is taken), and its readiness probe, which goes over a
    unix socket in the 0700 data directory, sends that process nothing."""
    import socket
    import threading

    srv = EmbeddedRedis(str(tmp_path / "r"))
    assert stat.S_IMODE(os.stat(srv.socket_path).st_mode) & 0o077 == 0
    os.kill(srv.pid, signal.SIGKILL)
    srv.process.wait()
    received = bytearray()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind((srv.host, srv.port))
    squatter.listen()
    squatter.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:  # accept and record whatever anyone sends
        while not done.is_set():
            try:
                conn, _ = squatter.accept()
            except OSError:
                continue
            conn.settimeout(0.2)
            with conn:
                while not done.is_set():
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        continue
                    if not data:
                        break
                    received.extend(data)
                    conn.sendall(b"+PONG\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(RuntimeError, match="exited with code"):
            srv.restart()
    finally:
        done.set()
        thread.join(timeout=5)
        squatter.close()
        srv.stop()
    assert srv._admin_password.encode() not in received and b"AUTH" not in received


def test_a_long_data_dir_gets_a_short_private_socket(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(str(deep)) as srv:
        assert len(srv.socket_path) <= 100 and not srv.socket_path.startswith(str(deep))
        assert stat.S_IMODE(os.stat(os.path.dirname(srv.socket_path)).st_mode) == 0o700
        assert redis.Redis.from_url(srv.url).ping()
        sock_dir = os.path.dirname(srv.socket_path)
    assert not os.path.exists(sock_dir)
