"""The training loop's two background threads, so an update never waits on I/O.

* `PriorityWriter`: new priorities go back to the replay shards in order, from a
  bounded queue (its back-pressure), while the learner computes the next update.
* `Poller`: polls the other roles (``poll_external() -> RunStatus``) every
  period and keeps the newest answer and the finished episodes for the loop.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

log_ = logging.getLogger(__name__)


@dataclass
class RunStatus:
    """What ``poll_external`` answers: the other roles' state, as the launcher's
    monitor (`deploy.monitor.RunMonitor.poll`) sees it.

    frames, transitions:     this run's totals from the actors (env frames; pushed
                             transitions acknowledged by the replay)
    episodes:                (raw return, length) finished since the previous answer
    epsilon_min, epsilon_max: the actors' exploration range now (None: unknown)
    actor_weight_versions:   the weight version each actor acts with
    replay_size:             transitions stored now (None: unknown)
    replay_inserted:         transitions the replay has stored since it was created
                             (cumulative over restarts of this run)
    replay_bytes:            the replay Redis servers' used memory
    replay_unavailable_s:    seconds the replay has been unavailable (None: it is fine)
    faults:                  what faults cost so far, by name (`_FAULT_METRICS` are
                             recorded as metrics; the launcher's summary has them all)
    """

    frames: int = 0
    transitions: int = 0
    episodes: list[tuple[float, int]] = field(default_factory=list)
    epsilon_min: float | None = None
    epsilon_max: float | None = None
    actor_weight_versions: list[int] = field(default_factory=list)
    replay_size: int | None = None
    replay_inserted: int = 0
    replay_bytes: int | None = None
    replay_unavailable_s: float | None = None
    faults: dict[str, float] = field(default_factory=dict)


class PriorityWriter:
    """Background thread sending new priorities to the replay, so the next update
    never waits for the replay's round trip. Pending updates are coalesced into one
    ``update_priorities(keys, priorities)`` call, and calls are made one at a time
    (each waits for the replay's answer), so the replay applies them in the order
    the learner produced them. The queue holds at most ``max_pending`` updates
    (the loop blocks beyond that: back-pressure instead of unbounded memory). A
    failing call (the replay is restarting or unavailable) is logged and dropped:
    priorities are hints, the transitions keep their old priority."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray], None], max_pending: int = 64):
        self._fn = fn
        self._q: queue.Queue[tuple[np.ndarray, np.ndarray] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(target=self._run, name="apex-priorities", daemon=True)
        self.calls = 0
        self.failures = 0

    def start(self) -> None:
        self._thread.start()

    def put(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self._q.put((keys, priorities))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued update has been sent, at most ``timeout`` seconds
        (None: no limit); returns whether they were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._q.all_tasks_done:
            while self._q.unfinished_tasks:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._q.all_tasks_done.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Send what is queued (at most ``timeout`` seconds: a replay that does not
        answer loses these hints, said in the log, rather than hanging the stop)."""
        if not self.flush(timeout):
            log_.warning("priority updates not sent within %g s: dropped", timeout)
        try:
            self._q.put(None, timeout=1.0)
        except queue.Full:
            pass  # the thread is stuck in a call; it is a daemon
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            items = [self._q.get()]
            while True:
                try:
                    items.append(self._q.get_nowait())
                except queue.Empty:
                    break
            live = [it for it in items if it is not None]
            try:
                if live:
                    keys = np.concatenate([k for k, _ in live])
                    prios = np.concatenate([p for _, p in live])
                    self._fn(keys, prios)
                    self.calls += 1
            except Exception as exc:  # noqa: BLE001 - a replay hiccup must not stop training
                self.failures += 1
                if self.failures <= 3 or self.failures % 100 == 0:
                    log_.warning("update_priorities failed (%d so far): %s", self.failures, exc)
            finally:
                for _ in items:
                    self._q.task_done()
            if len(live) < len(items):
                return


class Poller:
    """Background thread calling ``poll_external()`` every ``period`` seconds, so a
    slow actor or replay answer never stalls an update. Keeps the newest answer and
    accumulates the finished episodes of every answer until `take` collects them."""

    def __init__(self, fn: Callable[[], RunStatus], period: float):
        self._fn, self._period = fn, period
        self._lock = threading.Lock()
        self._latest: RunStatus | None = None
        self._episodes: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="apex-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poll_now(self) -> None:
        try:
            status = self._fn()
        except Exception as exc:  # noqa: BLE001 - keep the last good answer
            log_.warning("poll_external failed: %s", exc)
            return
        with self._lock:
            self._episodes.extend((float(r), int(n)) for r, n in status.episodes)
            self._latest = replace(status, episodes=[])

    def take(self) -> tuple[RunStatus | None, list[tuple[float, int]]]:
        with self._lock:
            episodes, self._episodes = self._episodes, []
            return self._latest, episodes

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_now()
            self._stop.wait(self._period)
