"""`apex-dqn train --in-process`: actors, replay shards and learner in one process.

The same classes as a Ray run, wired without Ray:

* each `actors.actor.ApexActor` runs ``run()`` in a thread of this process;
* each `replay_server.shard.ReplayShard` ingests in its own thread;
* the learner samples in its own thread (`InlineData`: `ReplaySampler.sample`,
  no loader processes), and publishes weights into `LocalWeights`, which the
  actors poll;
* evaluation runs in a thread (`learner.evaluator.ThreadBackend`).

Redis stays real (the embedded redis-server, or ``--redis-url``): writers,
shards and sampler talk to it exactly as in a Ray run. What a debugger gains:
one process, so ``breakpoint()`` anywhere in an actor, the shard or the learner
stops the run there, and tests bound by ``--max-updates`` run without Ray's
start-up (~10 s here). What it costs: every role shares one interpreter (the
GIL), so on several cores it is slower than a Ray run (docs/architecture.md
has the measurement). The launcher (`deploy.launcher._run`) chooses these
classes instead of the Ray fleets; the training loop, the replay ratio, the
monitor and the summary are the same code.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.config import Config
from deploy.fleet import FleetError, FleetStats, shard_arguments
from replay_server.endpoints import ShardEndpoint, pair
from replay_server.loader import LoaderStatus
from replay_server.protocol import ReplayUnavailable, ShardStats

log = logging.getLogger(__name__)


class LocalWeights:
    """The weight store of an in-process run: the learner publishes, actors poll.

    Thread-safe. Weights are copied on publish, so a subscriber never sees a
    tensor that the learner is still updating."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._weights: dict[str, np.ndarray] = {}

    def publish(self, version: int, weights: dict[str, np.ndarray]) -> bool:
        copied = {k: np.array(v, copy=True) for k, v in weights.items()}
        with self._lock:
            if version <= self._version:
                return False
            self._version, self._weights = version, copied
        return True

    def latest(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        with self._lock:
            if self._version > have_version:
                return self._version, self._weights
        return None

    def subscriber(self) -> LocalSubscriber:
        return LocalSubscriber(self)


class LocalSubscriber:
    """`common.weights.WeightSubscriber`'s interface over `LocalWeights`."""

    def __init__(self, store: LocalWeights) -> None:
        self._store = store
        self.version = -1
        self.failures = 0

    def poll(self) -> tuple[int, dict[str, np.ndarray]] | None:
        got = self._store.latest(self.version)
        if got is not None:
            self.version = got[0]
        return got


@dataclass
class _LocalActor:
    actor: Any
    thread: threading.Thread
    error: BaseException | None = None
    restarts: int = 0  # never: a failed actor thread ends the run


class LocalActors:
    """``cfg.actor.actors`` `ApexActor` s, each ``run()`` in a thread; the
    interface of `deploy.fleet.ActorFleet` that the launcher's monitor uses."""

    def __init__(
        self, cfg: Config, eps: list[ShardEndpoint], weights: LocalWeights, start_frames: int = 0
    ) -> None:
        from actors.actor import ApexActor

        n = cfg.actor.actors
        each = max(0, int(start_frames)) // max(1, n)
        self.actors: list[_LocalActor] = []
        self.episodes_total = 0
        self._eps: tuple[float, float] = (float("nan"), float("nan"))
        try:
            for i in range(n):
                actor = ApexActor(
                    cfg,
                    i,
                    eps[i % len(eps)].url,
                    num_actors=n,
                    subscriber=weights.subscriber(),
                    torch_threads=None,  # one process: the learner sets torch's threads
                )
                entry = _LocalActor(actor, threading.Thread())
                entry.thread = threading.Thread(
                    target=self._run, args=(entry, each), name=f"apex-actor-{i}", daemon=True
                )
                self.actors.append(entry)
        except BaseException:
            for a in self.actors:
                a.actor.close()
            raise
        for a in self.actors:
            a.thread.start()

    @staticmethod
    def _run(entry: _LocalActor, schedule_frames: int) -> None:
        try:
            entry.actor.run(schedule_frames=schedule_frames)
        except BaseException as exc:  # noqa: BLE001 - poll() ends the run with it
            entry.error = exc
            log.exception("actor %d failed", entry.actor.index)

    def poll(self, timeout: float = 1.0) -> FleetStats:
        """Run totals and the episodes since the last poll; raises `FleetError`
        when an actor thread failed (the run ends, as when a Ray actor cannot run)."""
        for a in self.actors:
            if a.error is not None:
                raise FleetError(f"actor {a.actor.index} failed: {a.error!r}")
        return self._stats([a.actor.stats(reset_episodes=True) for a in self.actors])

    def _stats(self, stats: list[Any]) -> FleetStats:
        episodes = [
            (r, n) for s in stats for r, n in zip(s.episode_returns, s.episode_lengths, strict=True)
        ]
        self.episodes_total += len(episodes)
        if stats:
            self._eps = (min(s.epsilon_min for s in stats), max(s.epsilon_max for s in stats))
        return FleetStats(
            frames=sum(s.frames for s in stats),
            env_steps=sum(s.env_steps for s in stats),
            transitions_pushed=sum(s.transitions_pushed for s in stats),
            transitions_dropped=sum(s.transitions_dropped for s in stats),
            pushes_failed=sum(s.pushes_failed for s in stats),
            transitions_buffered=sum(s.transitions_buffered for s in stats),
            episodes=episodes,
            episodes_total=self.episodes_total,
            epsilon_min=self._eps[0],
            epsilon_max=self._eps[1],
            actor_weight_versions=[s.weight_version for s in stats],
            writer_resets=sum(s.replay_resets for s in stats),
        )

    def stop(self, timeout: float = 20.0) -> FleetStats:
        """Stop every actor (each pushes what it holds first) and join its thread."""
        for a in self.actors:
            a.actor.stop()
        deadline = time.monotonic() + timeout
        for a in self.actors:
            a.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if a.thread.is_alive():
                log.warning("actor %d did not stop within %.0f s", a.actor.index, timeout)
        for a in self.actors:  # each outbox counts what it could not push as dropped
            if not a.thread.is_alive():
                a.actor.close()
        return self._stats([a.actor.stats(reset_episodes=True) for a in self.actors])


class LocalReplay:
    """One `ReplayShard` per Redis, ingesting in its own thread; the interface of
    `deploy.fleet.ReplayFleet` that the launcher uses."""

    def __init__(
        self,
        cfg: Config,
        eps: list[ShardEndpoint],
        capacity_per_shard: int,
        identity: Any,
        owner: str | None = None,
    ) -> None:
        from replay_server.shard import ReplayShard

        self.shards = []
        for ep in eps:
            args, kwargs = shard_arguments(cfg, ep, capacity_per_shard, identity, owner)
            self.shards.append(ReplayShard(*args, **kwargs))
        self.links = pair(self.shards, eps)
        self.restarts = 0
        self._first = [s.stats() for s in self.shards]

    def stats(self, timeout: float | None = None) -> list[ShardStats | None]:
        return [s.stats() for s in self.shards]

    def baseline(self) -> list[ShardStats | None]:
        return list(self._first)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until each shard has ingested what writers queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(s.queued() for s in self.shards):
            time.sleep(0.05)

    def stop(self) -> None:
        for s in self.shards:
            s.stop()


class InlineData:
    """`replay_server.loader.DataSource`'s interface, sampling in the caller's
    thread (`ReplaySampler.sample`: draw, fetch, decode): no loader processes."""

    def __init__(self, sampler: Any, batch_size: int, backoff: float = 0.1) -> None:
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.backoff = backoff
        self.batches = 0
        self.wait_s = 0.0
        self.outages = 0
        self.outage_s = 0.0
        self.last_outage = ""
        self._since: float | None = None

    def sample(self, beta: float) -> Any:
        t0 = time.monotonic()
        try:
            batch = self.sampler.sample(self.batch_size, beta)
        except ReplayUnavailable as exc:
            if self._since is None:
                self._since = time.monotonic()
                self.outages += 1
                self.last_outage = str(exc)
                log.warning("replay unavailable, the learner waits for it: %s", exc)
            time.sleep(self.backoff)
            return None
        finally:
            self.wait_s += time.monotonic() - t0
        if self._since is not None:
            gone = time.monotonic() - self._since
            self.outage_s += gone
            self._since = None
            log.warning("replay available again after %.1f s", gone)
        if batch is not None:
            self.batches += 1
        return batch

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.sampler.update_priorities(keys, priorities)

    def status(self) -> LoaderStatus:
        now = None if self._since is None else time.monotonic() - self._since
        return LoaderStatus(
            unavailable_s=now,
            outages=self.outages,
            outage_s=self.outage_s + (now or 0.0),
            last_outage=self.last_outage,
            batches=self.batches,
            wait_s=self.wait_s,
            restarts=0,
            loader_cpu_s=0.0,
        )

    def close(self) -> None:
        pass
