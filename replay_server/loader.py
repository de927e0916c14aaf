"""The learner's data source: loader processes fill shared batch slots.

Call order (the driver; one per learner)::

    data = DataSource(sampler, batch_size=512, workers=2, prefetch=4)
    batch = data.sample(beta)            # SampleBatch or None (nothing within ~1 s)
    data.update_priorities(batch.keys, new_priorities)
    data.status()                        # LoaderStatus: outages, waits, restarts
    data.close()

Who does what, per batch:

1. a feeder thread in this process (one per loader process) reserves a slot of
   shared memory, draws the rows (`ReplaySampler.draw`: rate limiter and
   ``shard.sample``, i.e. the Ray calls to the shard actors) and writes their
   frame ids into the slot;
2. its loader process (`replay_server.loader_worker`) fetches the frames
   (one round trip of MGETs per shard, sent while it decodes the previous
   batch) and decodes them straight into the slot;
3. the feeder finishes the batch (`ReplaySampler.finish`) and queues it;
   ``sample(beta)`` takes it and computes the importance weights with the beta
   it is given (nothing else crosses threads).

Why processes (measured in ``bench/replay.py``; see the README): decoding and
stacking 3.5K frames per batch is Python-bound, so threads share one core
through the GIL, and the learner's own thread competes with them; N processes
use N cores. The driver keeps the draws because only it can call the shard
actors. Batches reach the learner without a copy: ``obs``/``next_obs`` are views
of a slot, and the slot is reused only after every view of it is gone.

Outages: while the replay is unavailable (Redis down, loading or refusing; a
shard actor dead or restarting), feeders back off (0.1 s doubling to 5 s) and
retry; ``status().unavailable_s`` says for how long, and batches resume by
themselves. Any other error in a feeder or a loader process is a bug:
``sample`` raises it. A loader process that dies is restarted (at most
``MAX_RESTARTS`` within ``RESTART_WINDOW_S``, then that is an error too).
"""

from __future__ import annotations

import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.types import FRAME_SHAPE, STACK, SampleBatch
from replay_server.frames import FetchResult
from replay_server.loader_worker import Channel, SlotLayout, map_slots
from replay_server.protocol import ReplayUnavailable
from replay_server.sampler import Draw, DrawnBatch, ReplaySampler

log = logging.getLogger(__name__)

DEPTH = 3  # tasks in flight per loader process: one decoding, one in Redis, one drawn
BACKOFF_S = (0.1, 5.0)  # first and longest wait between retries while unavailable
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
START_TIMEOUT_S = 120.0
_REPO = str(Path(__file__).resolve().parents[1])


@dataclass
class LoaderStatus:
    """What the data source reports (plain numbers).

    unavailable_s:  seconds the replay has been unavailable, now; None when it is not
    outages:        times it became unavailable
    outage_s:       seconds unavailable in all (the current outage included)
    last_outage:    the newest outage's message ("" if none)
    batches:        batches handed to the learner
    wait_s:         seconds ``sample`` waited for a batch
    restarts:       loader processes restarted after they died
    loader_cpu_s:   CPU seconds the loader processes used (as of their last answers)
    """

    unavailable_s: float | None
    outages: int
    outage_s: float
    last_outage: str
    batches: int
    wait_s: float
    restarts: int
    loader_cpu_s: float


class SlotRing:
    """``slots`` batch slots in one shared memory block (`SlotLayout`).

    Linux: a memfd (no file in /dev/shm to leak or to outgrow a container's
    shm_size); elsewhere an unlinked temporary file. Children map it through an
    inherited descriptor (``fd``).
    """

    def __init__(self, capacity: int, slots: int) -> None:
        self.layout = SlotLayout(capacity, slots)
        size = self.layout.total_bytes
        if hasattr(os, "memfd_create"):
            self.fd = os.memfd_create("apex-replay-slots", os.MFD_CLOEXEC)
        else:
            fd, path = tempfile.mkstemp(prefix="apex-replay-slots-")
            os.unlink(path)
            self.fd = fd
        os.ftruncate(self.fd, size)
        self.buf = map_slots(self.fd, size)
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self._free.put(i)

    def take(self, timeout: float) -> int | None:
        try:
            return self._free.get(timeout=timeout)
        except queue.Empty:
            return None

    def give(self, i: int) -> None:
        self._free.put(i)

    def ids(self, i: int) -> np.ndarray:
        return self.layout.ids(self.buf, i)

    def ok(self, i: int) -> np.ndarray:
        return self.layout.ok(self.buf, i)

    def export(self, i: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """obs, next_obs (uint8[n, 4, 84, 84]) of slot i; the slot returns to the
        free list once every view of them is gone (they share one buffer base)."""
        lay = self.layout
        mv = memoryview(self.buf)[i * lay.slot_bytes : i * lay.slot_bytes + lay.frames_bytes]
        frames = np.frombuffer(mv, np.uint8).reshape(2, lay.capacity, STACK, *FRAME_SHAPE)
        weakref.finalize(frames.base, self._free.put, i)
        return frames[0, :n], frames[1, :n]

    def close(self) -> None:
        try:
            self.buf.close()
        except BufferError:
            pass  # a batch is still held: the mapping goes with its last view
        os.close(self.fd)


class LoaderProcess:
    """One ``python -m replay_server.loader_worker`` child and its pipes."""

    def __init__(self, index: int, ring: SlotRing, init: dict) -> None:
        self.index, self.ring, self.init = index, ring, init
        self.proc: subprocess.Popen | None = None
        self.chan: Channel | None = None
        self.start()

    def start(self) -> None:
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replay_server.loader_worker"]
                + [str(task_r), str(res_w), str(self.ring.fd)],
                pass_fds=(task_r, res_w, self.ring.fd),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C goes to the driver, which stops us in order
                env=env,
            )
        finally:
            os.close(task_r)
            os.close(res_w)
        self.chan = Channel(res_r, task_w)
        self.chan.send(self.init)
        try:
            msg = self.chan.recv(timeout=START_TIMEOUT_S)
        except EOFError:
            msg = None
        if not msg or "ready" not in msg:
            code = self.proc.poll()
            self.stop()
            raise RuntimeError(
                f"replay loader process {self.index} did not start (exit code {code}); "
                "its error is on stderr above"
            )

    def submit(self, seq: int, slot: int, draw: Draw) -> None:
        assert self.chan is not None
        spans = [list(s) for s in draw.spans()]
        self.chan.send({"t": seq, "slot": slot, "n": len(draw), "spans": spans})

    def result(self, timeout: float) -> dict | None:
        """The next result; None after timeout; EOFError when the process died."""
        assert self.chan is not None
        return self.chan.recv(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self.chan is not None:
            self.chan.close()  # EOF on its task pipe: it exits after the current task
            self.chan = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class BatchLoader:
    """Feeder threads + loader processes + a queue of finished `DrawnBatch` es.

    sampler:     draws rows and finishes batches (this process)
    batch_size:  rows per batch (the slot capacity)
    workers:     loader processes (one feeder thread each)
    prefetch:    finished batches queued ahead of the learner
    """

    def __init__(
        self, sampler: ReplaySampler, batch_size: int, workers: int = 2, prefetch: int = 4
    ) -> None:
        if workers < 1 or prefetch < 1 or batch_size < 1:
            raise ValueError(
                f"workers={workers}, prefetch={prefetch}, batch_size={batch_size} must be >= 1"
            )
        self.sampler, self.batch_size = sampler, int(batch_size)
        # queued + in flight + the learner's current and previous batch
        self.ring = SlotRing(batch_size, prefetch + DEPTH * workers + 2)
        self.ready: queue.Queue[DrawnBatch] = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.restarts = 0
        self._restart_times: deque[float] = deque()
        self.outages = 0
        self.outage_s = 0.0
        self.last_outage = ""
        self._since: float | None = None
        self._recovered_at = 0.0
        self._seq = 0
        self._cpu: dict[int, float] = {}  # loader index -> CPU s of its current process
        self._cpu_before = 0.0  # CPU s of processes that were restarted
        init = {
            "urls": list(sampler.urls),
            "namespace": sampler.namespace,
            "codec": sampler.codec_name,
            "capacity": self.batch_size,
            "slots": self.ring.layout.slots,
        }
        self.procs: list[LoaderProcess] = []
        try:
            for i in range(workers):
                self.procs.append(LoaderProcess(i, self.ring, init))
        except BaseException:
            self.close()
            raise
        self._threads = [
            threading.Thread(target=self._feed, args=(p,), name=f"replay-feeder-{p.index}")
            for p in self.procs
        ]
        for t in self._threads:
            t.daemon = True
            t.start()

    # ---- outage bookkeeping (any feeder thread) --------------------------------
    def unavailable_s(self) -> float | None:
        with self._lock:
            return None if self._since is None else time.monotonic() - self._since

    def _unavailable(self, exc: BaseException, asked_at: float) -> None:
        """A call made at ``asked_at`` (monotonic) found the replay unavailable.
        One that was made before the last recovery is old news, not a new outage."""
        with self._lock:
            self.last_outage = str(exc)
            if self._since is not None or asked_at < self._recovered_at:
                return
            self._since = time.monotonic()
            self.outages += 1
        log.warning("replay unavailable, the learner waits for it: %s", exc)

    def _available(self, asked_at: float) -> None:
        """A call made at ``asked_at`` succeeded. One made before the outage began
        (a batch that was already fetched) does not end it."""
        with self._lock:
            if self._since is None or asked_at < self._since:
                return
            now = time.monotonic()
            gone = now - self._since
            self.outage_s += gone
            self._since = None
            self._recovered_at = now
        log.warning("replay available again after %.1f s", gone)

    # ---- feeders --------------------------------------------------------------
    def _feed(self, proc: LoaderProcess) -> None:
        inflight: deque[tuple[int, int, Draw, float]] = deque()  # seq, slot, draw, asked at
        backoff = BACKOFF_S[0]
        try:
            while not self._stop.is_set():
                asked_at = time.monotonic()  # of the call that may fail below
                try:
                    while len(inflight) < DEPTH and not self._stop.is_set():
                        asked_at = time.monotonic()
                        task = self._submit(proc)
                        if task is None:
                            break
                        inflight.append(task)
                    if not inflight:
                        continue
                    res = proc.result(timeout=0.2)
                    if res is None:
                        continue
                    seq, slot, draw, asked_at = inflight.popleft()
                    self._cpu[proc.index] = float(res.get("cpu", 0.0))
                    if res.get("t") != seq:
                        raise RuntimeError(
                            f"loader process answered task {res.get('t')}, not {seq}"
                        )
                    if res["status"] == "outage":
                        self.ring.give(slot)
                        self.sampler.cancel(draw)
                        raise ReplayUnavailable(res.get("msg", "replay unavailable"))
                    if res["status"] != "ok":
                        raise RuntimeError(f"replay loader process failed:\n{res.get('msg')}")
                    self._deliver(slot, draw, res)
                    self._available(asked_at)
                    backoff = BACKOFF_S[0]
                except ReplayUnavailable as exc:
                    self._unavailable(exc, asked_at)
                    try:
                        self._drain(proc, inflight)
                    except (EOFError, BrokenPipeError):  # and the process died meanwhile
                        self._drop(inflight)
                        self._restart(proc)
                    self._stop.wait(backoff)
                    backoff = min(2 * backoff, BACKOFF_S[1])
                except (EOFError, BrokenPipeError):  # the process died
                    self._drop(inflight)
                    self._restart(proc)
        except BaseException as exc:  # a bug: sample() raises it
            self.error = exc
            self._stop.set()
            self._drop(inflight)

    def _submit(self, proc: LoaderProcess) -> tuple[int, int, Draw, float] | None:
        """Reserve a slot, draw rows into it, hand it to the process; None when
        no slot is free or the sampler has nothing (then the caller waits)."""
        slot = self.ring.take(timeout=0.1)
        if slot is None:
            return None
        draw = None
        try:
            draw = self.sampler.draw(self.batch_size)
            if draw is None:
                self.ring.give(slot)
                return None
            self.ring.ids(slot)[: len(draw)] = draw.ids()
            with self._lock:
                self._seq += 1
                seq = self._seq
            proc.submit(seq, slot, draw)
        except BaseException:
            self.ring.give(slot)
            if draw is not None:
                self.sampler.cancel(draw)
            raise
        return seq, slot, draw, time.monotonic()

    def _deliver(self, slot: int, draw: Draw, res: dict) -> None:
        n = len(draw)
        obs, nxt = self.ring.export(slot, n)  # the slot is freed with these views
        ok = self.ring.ok(slot)[:n].copy()
        drawn = self.sampler.finish(
            draw, FetchResult(ok, int(res["missing"]), int(res["corrupt"])), obs, nxt
        )
        del obs, nxt
        if drawn is None:
            return
        while not self._stop.is_set():
            try:
                self.ready.put(drawn, timeout=0.1)
                return
            except queue.Full:
                pass

    def _drain(self, proc: LoaderProcess, inflight: deque) -> None:
        """After an outage: collect the other tasks' answers (their slots back)."""
        while inflight and not self._stop.is_set():
            res = proc.result(timeout=0.2)  # EOFError: the caller restarts the process
            if res is None:
                continue
            _, slot, draw, _ = inflight.popleft()
            self.ring.give(slot)
            self.sampler.cancel(draw)

    def _drop(self, inflight: deque) -> None:
        while inflight:
            _, slot, draw, _ = inflight.popleft()
            self.ring.give(slot)
            self.sampler.cancel(draw)

    def _restart(self, proc: LoaderProcess) -> None:
        now = time.monotonic()
        with self._lock:
            self.restarts += 1
            self._cpu_before += self._cpu.pop(proc.index, 0.0)
            self._restart_times.append(now)
            while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_S:
                self._restart_times.popleft()
            too_many = len(self._restart_times) > MAX_RESTARTS
        code = proc.proc.poll() if proc.proc is not None else None
        if too_many:
            raise RuntimeError(
                f"replay loader processes died {MAX_RESTARTS + 1} times within "
                f"{RESTART_WINDOW_S:g} s (last exit code {code}); their errors are on stderr"
            )
        log.warning("replay loader process %d died (exit code %s); restarting it", proc.index, code)
        proc.stop()
        if not self._stop.is_set():
            proc.start()

    def cpu_s(self) -> float:
        """CPU seconds the loader processes used, as of their last answers."""
        with self._lock:
            return self._cpu_before + sum(self._cpu.values())

    # ---- consumer ---------------------------------------------------------------
    def get(self, timeout: float) -> DrawnBatch | None:
        """The next finished batch, or None after ``timeout`` s. Raises
        RuntimeError when a feeder or loader process failed (not an outage)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.error is not None:
                raise RuntimeError(f"replay loader failed: {self.error!r}") from self.error
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return self.ready.get(timeout=min(0.1, left))
            except queue.Empty:
                continue

    def close(self) -> None:
        self._stop.set()
        for t in getattr(self, "_threads", []):
            t.join(timeout=10.0)
        for p in self.procs:
            p.stop()
        while not self.ready.empty():
            self.ready.get_nowait()
        self.ring.close()


class DataSource:
    """The learner's one handle on the replay: sampler, loader processes and beta.

    ``sample(beta)`` is the `learner.loop.TrainLoop` ``sample`` callable: it waits
    up to ``timeout`` s for a batch and applies the beta it is given.
    """

    def __init__(
        self,
        sampler: ReplaySampler,
        batch_size: int,
        workers: int = 2,
        prefetch: int = 4,
        timeout: float = 1.0,
    ) -> None:
        self.sampler = sampler
        self.timeout = float(timeout)
        self.loader = BatchLoader(sampler, batch_size, workers, prefetch)
        self.batches = 0
        self.wait_s = 0.0

    def sample(self, beta: float) -> SampleBatch | None:
        """The next batch with importance weights for ``beta``; None when none was
        ready within ``timeout`` (replay filling, rate-limited, or unavailable:
        see `status`)."""
        t0 = time.monotonic()
        try:
            drawn = self.loader.get(self.timeout)
        finally:
            self.wait_s += time.monotonic() - t0
        if drawn is None:
            return None
        self.batches += 1
        return drawn.weighted(beta)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.sampler.update_priorities(keys, priorities)

    def status(self) -> LoaderStatus:
        ld = self.loader
        now = ld.unavailable_s()
        return LoaderStatus(
            unavailable_s=now,
            outages=ld.outages,
            outage_s=ld.outage_s + (now or 0.0),
            last_outage=ld.last_outage,
            batches=self.batches,
            wait_s=self.wait_s,
            restarts=ld.restarts,
            loader_cpu_s=ld.cpu_s(),
        )

    def close(self) -> None:
        self.loader.close()

    def __enter__(self) -> DataSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
