"""What each fault costs a real training run: seconds to recover, transitions lost.

Runs `apex-dqn train` (Pong, small settings) as a subprocess and injects real
faults while it trains: kill -9 of the embedded redis-server (the driver
restarts it), of the replay shard's process, of an actor's process and of the
weight store (``apex-weights``; Ray restarts them); then, against a test-owned
"external" redis-server: a second run started on the live replay (refused), kill -9
and a restart 10 s later (``--outage-s``), ``OOM`` (``CONFIG SET maxmemory 1``) for
5 s, ``READONLY`` for 5 s (``REPLICAOF`` a dead master), its newest writes lost
(killed, its AOF cut back ~10 s mid-record, restarted; an actor killed inside those
10 s, so that its restarted writer's registration is among the writes lost), and a
restart *empty* (its data directory deleted); then, against an external
redis-server the run reaches only through a TCP proxy: a partition that drops
every packet for 120 s (``--partition-s``) and a SIGSTOP of redis-server for 60 s
(``--sigstop-s``), with the env frames the actors made meanwhile
(``frames_during``); then full disks (root only: two tmpfs): the logdir's
(checkpoints fail, training goes on) and the external Redis's (``MISCONF``: an
outage); last, kill -9 of ``apex-dqn train`` itself and ``--resume`` to the end
(`driver_kill_run`). Prints ONE JSON object:

* per fault: ``fault_s`` = how long the injected fault lasted (0 for a kill:
  what follows is the system's own recovery; 10 s down unless ``--outage-s``, 5 s of OOM), and
  ``recover_s`` = seconds from the end of the fault until the learner has made
  ``RECOVERED`` more updates than it had at the fault (so at least one of them
  sampled after the fault: a loader process has up to 3 batches in flight and
  the queue holds ``prefetch``; batches drawn before it do not count) and the
  progress line no longer says ``replay: unavailable`` (the shards have their
  Redis back), from progress lines printed every second;
* per run: the summary's fault counters next to what was inserted
  (``transitions_lost`` against ``replay_inserted``).

Baseline: the same run's updates/s once learning ran and before the first
fault (``updates_per_s_before``) against the last 20 s, after the last recovery
(``updates_per_s_after``): a fault must not leave the run slower.

    python bench/faults.py            # the five runs, ~17 minutes on 2 cores
    python bench/faults.py --only disk      # logdir's and Redis's disks full (root)
    python bench/faults.py --only embedded
    python bench/faults.py --only network   # partition 120 s, SIGSTOP 60 s
    python bench/faults.py --only driver    # kill -9 of the driver, then --resume
    python bench/faults.py --only external --outage-s 300   # a 5-minute outage

`TrainingRun` is also the harness of ``tests/test_faults.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from replay_server.keys import ReplayKeys  # noqa: E402
from replay_server.redis_proc import EmbeddedRedis  # noqa: E402

KEYS = ReplayKeys()  # the run's namespace (the default, ``apex``)

# Small and fast: learning starts within seconds, progress every second.
SMALL = [
    "--env", "PongNoFrameskip-v4",
    "--actors", "2",
    "--envs-per-actor", "4",
    "--min-replay", "400",
    "--capacity", "20000",
    "--batch-size", "32",
    "--samples-per-insert", "0",
    "--loader-workers", "1",
    "--prefetch", "2",
    "--log-every", "1",
    "--publish-seconds", "1",
    "--eval-every-minutes", "0",  # no evaluator (nor a final evaluation): faults only
]  # fmt: skip
PREFETCH, LOADER_WORKERS = 2, 1
_UPDATES = re.compile(r"\| updates ([0-9.]+)([KMG]?) ")
_FRAMES = re.compile(r"frames ([0-9.]+)([KMG]?) ")
_REPLAY = re.compile(r"\| replay ([0-9.]+)([KMG]?) ")
_SCALE = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}


def parse_updates(line: str) -> int | None:
    """The learner's update count in a progress line (SI-rounded above 1,000)."""
    m = _UPDATES.search(line)
    return int(float(m.group(1)) * _SCALE[m.group(2)]) if m else None


def parse_frames(line: str) -> int | None:
    """The actors' env frames in a progress line (SI-rounded above 1,000)."""
    m = _FRAMES.search(line) if line.startswith("[apex] frames") else None
    return int(float(m.group(1)) * _SCALE[m.group(2)]) if m else None


def parse_replay(line: str) -> int | None:
    """The replay's size (transitions) in a progress line (SI-rounded above 1,000)."""
    m = _REPLAY.search(line) if line.startswith("[apex] frames") else None
    return int(float(m.group(1)) * _SCALE[m.group(2)]) if m else None


class TrainingRun:
    """``apex-dqn train`` in a subprocess, its output read line by line (with the
    time each line arrived), and its processes found among its descendants."""

    def __init__(self, args: list[str], logdir: Path, env: dict[str, str] | None = None):
        self.logdir = logdir
        self.summary_path = logdir / "summary.json"
        environ = {
            **os.environ,
            "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": str(REPO),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", "train", *args,
             "--logdir", str(logdir), "--summary-json", str(self.summary_path)],
            cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, start_new_session=True,
        )  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.updates = 0
        self.frames = 0  # the newest progress line's env frames
        self.unavailable = False  # the newest progress line says the replay is down
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            with self._lock:
                self.lines.append((now, line.rstrip("\n")))
                n = parse_updates(line)
                if n is not None and line.startswith("[apex] frames"):
                    self.updates = max(self.updates, n)
                    self.unavailable = "replay: unavailable" in line
                f = parse_frames(line)
                if f is not None:
                    self.frames = max(self.frames, f)

    def text(self) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines)

    def wait_for(self, cond, timeout: float, what: str) -> float:
        """Wait until ``cond()`` holds; returns the time it did. Fails with the log tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"the run exited ({self.proc.returncode}) before {what}:\n{self.tail()}"
                )
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.tail()}")

    def wait_updates(self, more_than: int, timeout: float, what: str) -> float:
        return self.wait_for(lambda: self.updates > more_than, timeout, what)

    def wait_recovered(self, more_than: int, timeout: float, what: str) -> float:
        """Updates beyond ``more_than`` and the replay reported available again."""
        return self.wait_for(
            lambda: self.updates > more_than and not self.unavailable, timeout, what
        )

    def wait_line(self, pattern: str, timeout: float, after: float = 0.0) -> float:
        rx = re.compile(pattern)

        def seen() -> bool:
            with self._lock:
                return any(t >= after and rx.search(line) for t, line in self.lines)

        return self.wait_for(seen, timeout, f"a line matching {pattern!r}")

    def tail(self, n: int = 40) -> str:
        with self._lock:
            return "\n".join(line for _, line in self.lines[-n:])

    def descendants(self, marker: str) -> list[psutil.Process]:
        """This run's processes whose command line starts with ``marker``
        (``ray::ReplayShard``, ``ray::ApexActor``), or for ``redis-server`` the
        embedded server (redis-server or valkey-server, whatever its path)."""
        out = []
        try:
            for p in psutil.Process(self.proc.pid).children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                exe = os.path.basename(cmd.split(" ")[0])
                if cmd.startswith(marker) or (
                    marker == "redis-server" and exe in ("redis-server", "valkey-server")
                ):
                    out.append(p)
        except psutil.NoSuchProcess:
            pass
        return out

    def kill9(self, marker: str) -> int:
        """kill -9 one of this run's processes (waits until one exists)."""
        self.wait_for(lambda: bool(self.descendants(marker)), 60, f"a {marker} process")
        proc = self.descendants(marker)[0]
        os.kill(proc.pid, signal.SIGKILL)
        return proc.pid

    def finish(self, timeout: float) -> tuple[int, dict[str, Any]]:
        """Wait for the run to end by itself; returns (exit code, summary)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the run did not end within {timeout:.0f} s:\n{self.tail()}"
            ) from None
        self._reader.join(10)
        summary = json.loads(self.summary_path.read_text()) if self.summary_path.exists() else {}
        return code, summary

    def stop(self) -> None:
        """Make sure nothing of this run is left (SIGTERM, then SIGKILL the group)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


RECOVERED = PREFETCH + 3 * LOADER_WORKERS + 1  # updates that must come from after the fault


def inject(run: TrainingRun, name: str, fault, timeout: float = 120.0) -> dict[str, Any]:
    """Run ``fault()`` (which returns when the fault is lifted) and time the
    recovery (see the module docstring)."""
    at = run.updates
    t0 = time.monotonic()
    fault()
    lifted = time.monotonic()
    t1 = run.wait_recovered(at + RECOVERED, timeout, f"the run to recover from {name}")
    return {
        "fault": name,
        "updates_at_fault": at,
        "fault_s": round(lifted - t0, 2),
        "recover_s": round(t1 - lifted, 2),
    }


def rate(run: TrainingRun, t_from: float, t_to: float) -> float:
    """Updates/s over progress lines in [t_from, t_to] once updates began."""
    pts = [(t, parse_updates(line)) for t, line in run.lines if t_from <= t <= t_to]
    pts = [(t, n) for t, n in pts if n]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return 0.0
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


def embedded_run(tmp: Path, seconds: float = 100.0) -> tuple[TrainingRun, list[dict], float]:
    """Faults of the default setup: the driver's own redis-server, the shard, an
    actor, the weight store."""
    run = TrainingRun([*SMALL, "--max-seconds", str(seconds)], tmp / "embedded")
    run.wait_updates(20, 120, "learning to start")
    t_first = time.monotonic()
    faults = [
        inject(run, "kill -9 redis-server (embedded)", lambda: run.kill9("redis-server")),
        inject(run, "kill -9 replay shard", lambda: run.kill9("ray::ReplayShard")),
        inject(run, "kill -9 actor", lambda: run.kill9("ray::ApexActor")),
        inject(run, "kill -9 weight store", lambda: run.kill9("ray::WeightStore")),
    ]
    return run, faults, t_first


def external_run(
    tmp: Path, seconds: float = 110.0, outage_s: float = 10.0
) -> tuple[TrainingRun, list[dict], float, EmbeddedRedis]:
    """Faults of a Redis the run does not own, in this order: a second run started
    against the live replay (refused: its entry holds its exit code and output);
    down for ``outage_s``; OOM for 5 s; READONLY for 5 s (the server made a
    replica of a master that never answers); its newest writes lost (redis-server
    killed and its AOF cut back ~10 s, mid-record: Redis loads a truncated AOF,
    ``aof-load-truncated``; an actor is killed inside those 10 s, so the writer
    its restart registers holds an incarnation that Redis then forgets; the cut
    waits, up to 60 s more, until the shard has stored transitions in the window,
    so that some of the replay is lost); back empty."""
    import redis

    data = tmp / "external-redis"
    server = EmbeddedRedis(str(data))
    run = TrainingRun(
        [*SMALL, "--max-seconds", str(seconds)],
        tmp / "external",
        env={"APEX_REDIS_URL": server.url},
    )
    state = {"server": server}
    run.wait_updates(20, 120, "learning to start")
    t_first = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "train", *SMALL, "--logdir", str(tmp / "second")],
        cwd=REPO,
        env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(REPO)}
        | {"APEX_REDIS_URL": server.url},
        capture_output=True,
        text=True,
        timeout=120,
    )

    def down() -> None:
        srv = state["server"]
        t = time.monotonic()
        srv.kill()
        run.wait_line(r"replay: unavailable", 30, after=t)
        time.sleep(max(0.0, outage_s - (time.monotonic() - t)))  # the injected outage
        srv.restart()

    def oom_5s() -> None:
        admin = redis.Redis.from_url(state["server"].admin_url)
        admin.config_set("maxmemory", 1)
        t = time.monotonic()
        run.wait_line(r"replay: unavailable", 30, after=t)
        time.sleep(max(0.0, 5.0 - (time.monotonic() - t)))  # the injected refusal lasts ~5 s
        admin.config_set("maxmemory", 0)
        admin.close()

    def readonly_5s() -> None:
        with socket.socket() as sock:  # a port nobody answers on: the master never syncs
            sock.bind(("127.0.0.1", 0))
            dead = sock.getsockname()[1]
        admin = redis.Redis.from_url(state["server"].admin_url)
        admin.execute_command("REPLICAOF", "127.0.0.1", dead)
        t = time.monotonic()
        try:
            run.wait_line(r"replay: unavailable", 30, after=t)
            time.sleep(max(0.0, 5.0 - (time.monotonic() - t)))  # the refusal lasts ~5 s
        finally:
            admin.execute_command("REPLICAOF", "NO", "ONE")
            admin.close()

    cut: dict[str, int] = {}

    def lose_newest_writes() -> None:
        admin = redis.Redis.from_url(state["server"].admin_url)
        aof = _incr_aof(data)
        size = aof.stat().st_size
        t0 = time.monotonic()
        next_slot = int(admin.hget(KEYS.meta, "next_slot") or 0)
        # a writer registers inside the window: an actor killed now is restarted
        # and its new writer takes the next incarnation, which Redis then loses
        before = int(admin.get(KEYS.incarnation) or 0)
        cut["actor_pid"] = run.kill9("ray::ApexActor")
        run.wait_for(
            lambda: int(admin.get(KEYS.incarnation) or 0) > before,
            60,
            "the restarted actor's writer to register",
        )
        cut["incarnation_lost"] = int(admin.get(KEYS.incarnation))
        # the shard must store something inside the window, or nothing of the replay
        # is lost (the writers may still be backing off after READONLY, or waiting
        # on the insert budget of a slow learner): wait for its next slot to move
        run.wait_for(
            lambda: int(admin.hget(KEYS.meta, "next_slot") or 0) > next_slot,
            60,
            "the shard to store transitions inside the lost window",
        )
        cut["slots_written"] = int(admin.hget(KEYS.meta, "next_slot")) - next_slot
        admin.close()
        time.sleep(max(2.0, 10 - (time.monotonic() - t0)))  # its pushes, among those lost
        if _incr_aof(data) != aof:
            raise RuntimeError("Redis rewrote its AOF inside the window; run the fault again")
        state["server"].kill()
        t = time.monotonic()
        cut["bytes"] = aof.stat().st_size - size - 7
        with open(aof, "r+b") as fh:  # 7 bytes into the first lost record
            fh.truncate(size + 7)
        state["server"].restart()
        # the restart takes ~0.1 s, the learner goes on from prefetched batches:
        # wait for the shard to find the loss before the next fault can mask it
        # (the shard's line: a writer says the same words of its incarnation)
        run.wait_line(r"replay shard: Redis lost its newest writes", 60, after=t)

    def back_empty() -> None:
        old = state["server"]
        old.kill()
        shutil.rmtree(data)
        state["server"] = EmbeddedRedis(str(data), port=old.port, password=old.password)

    faults = [
        {
            "fault": "a second run started on the live replay",
            "exit_code": second.returncode,
            "output": (second.stdout + second.stderr)[-2000:],
        },
        inject(run, f"redis-server down {outage_s:g} s (external)", down),
        inject(run, "OOM for 5 s (maxmemory)", oom_5s),
        inject(run, "READONLY for 5 s (REPLICAOF a master that never answers)", readonly_5s),
        inject(run, "newest writes lost (AOF cut back 10 s, mid-record)", lose_newest_writes),
        inject(run, "redis-server back empty (data lost)", back_empty, timeout=180),
    ]
    faults[4]["aof_bytes_lost"] = cut.get("bytes")
    faults[4]["incarnation_lost"] = cut.get("incarnation_lost")
    faults[4]["slots_written_in_window"] = cut.get("slots_written")
    return run, faults, t_first, state["server"]


def _incr_aof(data: Path) -> Path:
    """The server's newest incremental AOF file (the manifest's ``type i`` entry)."""
    manifest = next(data.rglob("appendonly.aof.manifest"))
    names = [
        line.split()[1]
        for line in manifest.read_text().splitlines()
        if line.split()[-2:] == ["type", "i"]
    ]
    return manifest.parent / names[-1]


def network_run(
    tmp: Path, seconds: float = 150.0, partition_s: float = 40.0, stop_s: float = 35.0
) -> tuple[TrainingRun, list[dict], float, EmbeddedRedis, Any]:
    """Network faults between every process of the run and its (external) Redis,
    which it reaches only through a TCP proxy on loopback (`bench.netproxy.Proxy`):
    a partition that drops every packet for ``partition_s`` (calls hang until
    their timeouts), then redis-server SIGSTOPped for ``stop_s``. Each fault also
    records ``frames_during``: env frames the actors made while it lasted (their
    env loops do not wait on Redis)."""
    from bench.netproxy import Proxy

    server = EmbeddedRedis(str(tmp / "network-redis"))
    proxy = Proxy(server.host, server.port)
    run = TrainingRun(
        [*SMALL, "--max-seconds", str(seconds)],
        tmp / "network",
        env={"APEX_REDIS_URL": proxy.url_for(server.url)},
    )
    run.wait_updates(20, 120, "learning to start")
    t_first = time.monotonic()
    during: dict[str, int] = {}

    def hold(name: str, seconds_: float) -> None:
        f0 = run.frames
        time.sleep(seconds_)  # the injected fault lasts this long
        during[name] = run.frames - f0

    def partition() -> None:
        proxy.mode = "blackhole"
        try:
            hold("partition", partition_s)
        finally:
            proxy.mode = "pass"

    def sigstop() -> None:
        os.kill(server.pid, signal.SIGSTOP)
        try:
            hold("sigstop", stop_s)
        finally:
            os.kill(server.pid, signal.SIGCONT)

    faults = [
        inject(run, f"network partition {partition_s:g} s (packets dropped)", partition, 240),
        inject(run, f"redis-server SIGSTOP {stop_s:g} s", sigstop, 240),
    ]
    faults[0]["frames_during"] = during["partition"]
    faults[1]["frames_during"] = during["sigstop"]
    return run, faults, t_first, server, proxy


def disk_run(
    tmp: Path, log_disk: Path, redis_disk: Path, seconds: float = 100.0, full_s: float = 10.0
) -> tuple[TrainingRun, list[dict], float, EmbeddedRedis]:
    """Full disks under a run: its logdir (checkpoints every 6 s, TensorBoard) on
    ``log_disk`` and its external Redis's data dir (the AOF) on ``redis_disk``, two
    small filesystems of their own (`bench.disks.mount_tmpfs`), each filled with a
    file until ENOSPC and freed again. The logdir's: checkpoints are not written
    (``checkpoint not written``) while training goes on; Redis's: Redis refuses
    writes (``MISCONF``), an outage, for ``full_s``."""
    from bench.disks import fill_disk

    server = EmbeddedRedis(str(redis_disk / "redis"))
    run = TrainingRun(
        [*SMALL, "--max-seconds", str(seconds), "--checkpoint-minutes", "0.1"],
        log_disk / "run",
        env={"APEX_REDIS_URL": server.url},
    )
    run.wait_updates(20, 120, "learning to start")
    t_first = time.monotonic()
    seen: dict[str, int] = {}

    def logdir_full() -> None:
        filler = fill_disk(log_disk)
        t = time.monotonic()
        try:
            run.wait_line(r"checkpoint not written", 60, after=t)
            at = run.updates
            run.wait_updates(at + 20, 60, "training to go on with its logdir's disk full")
            seen["updates_while_full"] = run.updates - at
        finally:
            filler.unlink()

    def redis_disk_full() -> None:
        filler = fill_disk(redis_disk)
        t = time.monotonic()
        try:
            run.wait_line(r"replay: unavailable", 60, after=t)
            time.sleep(max(0.0, full_s - (time.monotonic() - t)))  # Redis refuses meanwhile
        finally:
            filler.unlink()

    faults = [
        inject(run, "the logdir's disk full", logdir_full),
        inject(run, f"Redis's disk full for {full_s:g} s (MISCONF)", redis_disk_full),
    ]
    faults[0]["updates_while_full"] = seen.get("updates_while_full")
    return run, faults, t_first, server


def driver_kill_run(
    tmp: Path, resume_seconds: float = 60.0
) -> tuple[TrainingRun, TrainingRun, dict[str, Any]]:
    """kill -9 of ``apex-dqn train`` itself (the default setup: a local Ray and the
    embedded redis-server, both started by the driver), then ``train --resume
    LOGDIR/checkpoint.pt`` in the same logdir, to its end. Returns both runs and:

    * ``checkpoint_updates``: the updates of the checkpoint resumed from;
    * ``killed_at``, ``family``: when, and the killed driver's processes then
      (`leftovers` says which outlived it);
    * ``replay_before_kill`` / ``replay_at_resume``: the replay's size in the last
      progress line before the kill and the first one after the resume (the
      embedded server reloads its AOF);
    * ``resume_s``: seconds from starting the resumed run to its first update
      past the checkpoint's.
    """
    logdir = tmp / "driver"
    ckpt = logdir / "checkpoint.pt"
    first = TrainingRun([*SMALL, "--checkpoint-minutes", "0.2", "--max-seconds", "900"], logdir)
    first.wait_updates(20, 120, "learning to start")
    first.wait_for(ckpt.exists, 120, "the first periodic checkpoint")

    def replay_sizes(run: TrainingRun) -> list[int]:
        with run._lock:
            return [n for _, line in run.lines if (n := parse_replay(line)) is not None]

    # a replay far bigger than what the actors insert while the resumed run starts
    first.wait_for(lambda: max(replay_sizes(first), default=0) >= 8000, 180, "8K transitions")
    family = psutil.Process(first.proc.pid).children(recursive=True)
    # the embedded server (SIGTERM from the kernel when its parent dies: it
    # flushes its AOF) must be gone before the resumed run takes its data dir
    servers = first.descendants("redis-server")
    sizes = replay_sizes(first)
    os.kill(first.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    first.proc.wait()
    psutil.wait_procs(servers, timeout=60)
    import torch

    checkpoint_updates = int(torch.load(ckpt, weights_only=True)["updates"])
    t0 = time.monotonic()
    second = TrainingRun(["--resume", str(ckpt), "--max-seconds", str(resume_seconds)], logdir)
    t1 = second.wait_updates(checkpoint_updates, 240, "the resumed run's first update")
    resumed = replay_sizes(second)
    return (
        first,
        second,
        {
            "fault": "kill -9 of apex-dqn train, then --resume",
            "checkpoint_updates": checkpoint_updates,
            "killed_at": killed_at,
            "family": family,
            "replay_before_kill": sizes[-1] if sizes else None,
            "replay_at_resume": resumed[0] if resumed else None,
            "resume_s": round(t1 - t0, 2),
        },
    )


def leftovers(info: dict[str, Any], within_s: float = 120.0) -> tuple[list[str], float]:
    """The processes of `driver_kill_run`'s killed driver still alive ``within_s``
    after the kill (then killed), and the seconds until the last of the others
    exited. Ray's processes share the driver's fate, but Ray's dashboard and
    runtime-env agents take ~60-70 s: they report the raylet's death to the GCS,
    which died with it, and wait for that call to time out."""
    family: list[psutil.Process] = info["family"]
    deadline = info["killed_at"] + within_s
    while time.monotonic() < deadline and any(p.is_running() for p in family):
        time.sleep(0.5)
    gone_s = time.monotonic() - info["killed_at"]
    left = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.is_running():
                left.append(f"{p.pid} {' '.join(p.cmdline())[:80]}")
                p.kill()
    return left, round(gone_s, 1)


def _report(run: TrainingRun, faults: list[dict], t_first: float, code: int, summary: dict) -> dict:
    keys = (
        "replay_inserted", "transitions_lost", "transitions_dropped_by_actors",
        "transitions_lost_by_redis", "replay_resets", "transitions_lost_in_resets",
        "replay_outages", "replay_outage_s", "orphan_frames_collected", "shard_restarts",
        "actor_restarts", "redis_restarts", "writer_reregistrations", "checkpoint_failures",
        "updates", "frames",
    )  # fmt: skip
    t_last = max(t for t, _ in run.lines)
    return {
        "exit_code": code,
        "faults": faults,
        "updates_per_s_before": round(rate(run, 0.0, t_first), 2),
        "updates_per_s_after": round(rate(run, t_last - 20.0, t_last), 2),
        **{k: summary.get(k) for k in keys},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--only",
        choices=("embedded", "external", "network", "disk", "driver"),
        help="one of the five runs (disk: root only, it mounts two tmpfs)",
    )
    ap.add_argument(
        "--partition-s", type=float, default=120.0, help="network run: partition length"
    )
    ap.add_argument("--sigstop-s", type=float, default=60.0, help="network run: SIGSTOP length")
    ap.add_argument(
        "--outage-s",
        type=float,
        default=10.0,
        help="how long the external Redis stays down (default 10; the external run "
        "trains that much longer)",
    )
    args = ap.parse_args()
    if not 1 <= args.outage_s <= 3600:
        ap.error(f"--outage-s {args.outage_s:g}: give 1 to 3600 seconds")
    tmp = Path(tempfile.mkdtemp(prefix="apex-faults-"))
    out: dict[str, Any] = {}
    try:
        if args.only in (None, "embedded"):
            run, faults, t0 = embedded_run(tmp)
            try:
                code, summary = run.finish(300)
            finally:
                run.stop()
            out["embedded"] = _report(run, faults, t0, code, summary)
        if args.only in (None, "external"):
            run, faults, t0, server = external_run(
                tmp, seconds=130.0 + args.outage_s, outage_s=args.outage_s
            )
            try:
                code, summary = run.finish(300)
            finally:
                run.stop()
                server.stop()
            out["external"] = _report(run, faults, t0, code, summary)
        if args.only in (None, "network"):
            run, faults, t0, server, proxy = network_run(
                tmp,
                seconds=120.0 + args.partition_s + args.sigstop_s,
                partition_s=args.partition_s,
                stop_s=args.sigstop_s,
            )
            try:
                code, summary = run.finish(600)
            finally:
                run.stop()
                proxy.close()
                server.stop()
            out["network"] = _report(run, faults, t0, code, summary)
        if args.only in (None, "disk"):
            from bench.disks import mount_tmpfs, unmount

            disks = [tmp / "log-disk", tmp / "redis-disk"]
            try:
                why = mount_tmpfs(disks[0], "256m") or mount_tmpfs(disks[1], "512m")
                if why is not None:
                    print(
                        f"faults: disk run skipped: cannot mount a tmpfs ({why})", file=sys.stderr
                    )
                    out["disk"] = {"skipped": f"cannot mount a tmpfs: {why}"}
                else:
                    run, faults, t0, server = disk_run(tmp, *disks)
                    try:
                        code, summary = run.finish(300)
                    finally:
                        run.stop()
                        server.stop()
                    out["disk"] = _report(run, faults, t0, code, summary)
            finally:
                for d in disks:
                    unmount(d)
        if args.only in (None, "driver"):
            first, second, info = driver_kill_run(tmp)
            try:
                code, summary = second.finish(300)
                left, gone_s = leftovers(info)
            finally:
                first.stop()
                second.stop()
            del info["family"], info["killed_at"]
            out["driver"] = {
                **info,
                "processes_left": left,
                "processes_gone_s": gone_s,
                "exit_code": code,
                **{k: summary.get(k) for k in ("updates", "frames", "transitions_lost")},
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
