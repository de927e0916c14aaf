"""Ray wiring of the plain role classes: named actors, restarts, stats.

The role classes (`actors.actor.ApexActor`, `replay_server.shard.ReplayShard`,
`common.weights.WeightStore`) are plain classes that run without Ray (tests
construct them directly); where Ray is running, ApexActor asks it only whether
it was restarted, and the actor's `WeightSubscriber` fetches weights through it.
This module makes them Ray actors with clear names (they show in the Ray
dashboard under these names):

  apex-weights        WeightStore, num_cpus=0, on the driver's node, max_restarts=-1
                      (restarted empty; the next publish, every second, fills it;
                      actors keep their weights meanwhile)
  apex-replay-<k>     ReplayShard k, num_cpus=0, on the driver's node,
                      max_restarts=-1: a crash or kill -9 restarts it, and the new
                      process reloads its index from Redis and resumes ingesting
                      by itself (``autostart``); samplers and writers reconnect
  apex-actor-<i>      ApexActor i, num_cpus=1, max_restarts=-1 (a crash or kill -9
                      restarts it with the same index, hence the same epsilons,
                      and a decaying epsilon schedule goes on where it was)

`ActorFleet.poll()` collects stats from every actor without blocking for long,
notices restarted actors (their ``run`` call fails with ActorDiedError or returns
early) and calls ``run`` again, and keeps cumulative counters across restarts.
An actor whose constructor fails (bad settings, an env that cannot start), or
whose ``run`` keeps failing without progress, stops the run with `FleetError`
instead of being retried forever. `ReplayFleet` does the same bookkeeping for
the shards (restarts are noticed by a new process id).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.actor import ActorStats
from common.config import Config
from replay_server.endpoints import ShardEndpoint, pair
from replay_server.namespace import ReplayIdentity
from replay_server.protocol import ShardStats
from replay_server.remote import RemoteShard

log = logging.getLogger("apex.fleet")

# ActorStats counters that restart from 0 in a restarted actor process; the
# fleet adds what earlier processes had counted.
CUMULATIVE = ("frames", "env_steps", "transitions_pushed", "transitions_dropped", "pushes_failed")
WEIGHTS_NAME = "apex-weights"
MAX_RUN_FAILURES = 3  # consecutive failed ``run`` calls without a frame of progress


class FleetError(RuntimeError):
    """A role cannot run (its constructor fails, or it keeps failing); the message
    names the actor and the cause."""


def driver_node_strategy() -> NodeAffinitySchedulingStrategy:
    """Pin a zero-CPU actor (replay shard, weight store) to the driver's node.

    Hard affinity on purpose: with an empty resource request Ray 2.60 treats a
    soft node affinity as a hint and placed a shard on a worker node in about
    half of the compose-as-processes runs. The driver's node is alive by
    construction, and if it dies the run is over anyway.
    """
    return NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=False
    )


def start_weight_store() -> Any:
    from common.weights import WeightStore

    # Restarted by Ray when it dies (kill -9, a crash): it holds only the newest
    # version's ObjectRef (the weights themselves belong to the driver), the next
    # publish fills it again, and calls made meanwhile are retried (both kinds are
    # idempotent: publish keeps the newest version, latest only reads).
    cls = ray.remote(num_cpus=0, max_concurrency=4, max_restarts=-1, max_task_retries=-1)(
        WeightStore
    )
    return cls.options(name=WEIGHTS_NAME, scheduling_strategy=driver_node_strategy()).remote()


def _cause(exc: BaseException) -> str:
    """The last line of a Ray error's traceback text, without terminal colours."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def shard_arguments(
    cfg: Config,
    ep: ShardEndpoint,
    capacity_per_shard: int,
    identity: ReplayIdentity | None,
    owner: str | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the `replay_server.shard.ReplayShard` behind ``ep``: the
    one place both fleets (this Ray one and `deploy.inprocess.LocalReplay`) build
    their shards from, so the two cannot drift apart."""
    kwargs = {
        "alpha": cfg.replay.alpha,
        "codec": cfg.replay.codec,
        "namespace": ep.namespace,
        "identity": identity,
        "seed": cfg.run.seed + ep.index,
        "autostart": True,
        "owner": owner,
    }
    return (ep.url, capacity_per_shard), kwargs


class ReplayFleet:
    """The ``apex-replay-<k>`` shard actors and what the driver needs of them.

    ``links`` pair each shard's `RemoteShard` view with its endpoint (the sampler's
    input; ``shards`` are the views alone); `stats` answers with the
    last known `ShardStats` of a shard that does not answer in time (restarting,
    busy) and counts restarts (a new pid).
    """

    def __init__(
        self,
        cfg: Config,
        eps: list[ShardEndpoint],
        capacity_per_shard: int,
        identity: ReplayIdentity,
        owner: str | None = None,
        stats_timeout: float = 2.0,
    ) -> None:
        from replay_server.shard import ReplayShard

        cls = ray.remote(num_cpus=0, max_concurrency=8, max_restarts=-1)(ReplayShard)
        self.handles = []
        for ep in eps:
            args, kwargs = shard_arguments(cfg, ep, capacity_per_shard, identity, owner)
            self.handles.append(
                cls.options(
                    name=f"apex-replay-{ep.index}", scheduling_strategy=driver_node_strategy()
                ).remote(*args, **kwargs)
            )
        self.links = pair(
            [RemoteShard(h, name=f"replay shard {k}") for k, h in enumerate(self.handles)], eps
        )
        self.shards = [link.shard for link in self.links]
        self.stats_timeout = stats_timeout
        self.restarts = 0
        self._last: list[ShardStats | None] = [None] * len(eps)
        self._first: list[ShardStats | None] = [None] * len(eps)
        first = self.stats(timeout=60.0)  # the constructors ran (or raised)
        if any(s is None for s in first):
            raise FleetError("a replay shard did not start within 60 s")

    def stats(self, timeout: float | None = None) -> list[ShardStats | None]:
        """Every shard's newest stats (the last known ones where a shard is slow)."""
        refs = [h.stats.remote() for h in self.handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout or self.stats_timeout)
        done = set(ready)
        for k, ref in enumerate(refs):
            if ref not in done:
                continue
            try:
                st = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:
                    raise FleetError(f"replay shard {k} cannot start: {_cause(exc)}") from None
                continue
            prev = self._last[k]
            if prev is not None and (st.pid, st.started_at) != (prev.pid, prev.started_at):
                self.restarts += 1
                log.warning("replay shard %d was restarted (pid %d -> %d)", k, prev.pid, st.pid)
            self._last[k] = st
            if self._first[k] is None:
                self._first[k] = st
        return list(self._last)

    def baseline(self) -> list[ShardStats | None]:
        """The first stats of each shard in this run (for per-run differences)."""
        return list(self._first)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) until each shard has ingested what writers queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                left = ray.get([h.queued.remote() for h in self.handles], timeout=timeout)
            except (ray.exceptions.RayError, TimeoutError):
                return
            if not any(left):
                return
            time.sleep(0.05)

    def stop(self) -> None:
        for k, h in enumerate(self.handles):
            try:
                ray.get(h.stop.remote(), timeout=30)
            except ray.exceptions.RayError as exc:
                log.warning("replay shard %d did not stop cleanly: %s", k, _cause(exc))


@dataclass
class FleetStats:
    """What `ActorFleet.poll` returns: run totals and the episodes since the last poll.

    frames, env_steps, transitions_pushed, transitions_dropped, pushes_failed:
        this run's totals over all actor processes (restarted ones included)
    transitions_buffered: waiting in the actors' outboxes now (after `stop`:
        counted in ``transitions_dropped`` instead, the actors being gone)
    episodes: (raw return, length) finished since the previous poll
    episodes_total, epsilon_min, epsilon_max, actor_weight_versions,
    actor_restarts, writer_resets (times a writer registered again: its Redis lost
        the replay's data or handed its incarnation out twice)
    """

    frames: int = 0
    env_steps: int = 0
    transitions_pushed: int = 0
    transitions_dropped: int = 0
    pushes_failed: int = 0
    transitions_buffered: int = 0
    episodes: list[tuple[float, int]] = field(default_factory=list)
    episodes_total: int = 0
    epsilon_min: float = float("nan")
    epsilon_max: float = float("nan")
    actor_weight_versions: list[int] = field(default_factory=list)
    actor_restarts: int = 0
    writer_resets: int = 0


@dataclass
class _ActorState:
    index: int
    handle: Any
    run_ref: Any = None
    last: ActorStats | None = None
    base: dict = field(default_factory=lambda: dict.fromkeys(CUMULATIVE, 0))
    resets_base: int = 0
    restarts: int = 0  # new processes seen (Ray restarted the actor)
    reruns: int = 0  # times ``run`` was called again
    run_failures: int = 0
    frames_at_failure: int = -1
    stats_ref: Any = None


class ActorFleet:
    """Starts, watches and stops the ``apex-actor-<i>`` Ray actors."""

    def __init__(
        self,
        cfg: Config,
        eps: list[ShardEndpoint],
        weight_store: str = WEIGHTS_NAME,
        start_frames: int = 0,
    ):
        """start_frames: env frames of the run being resumed (all actors); each
        actor's decaying epsilon schedule starts at its share of them."""
        from actors.actor import ApexActor

        self.cfg = cfg
        n = cfg.actor.actors
        cls = ray.remote(num_cpus=1, max_restarts=-1, max_concurrency=2)(ApexActor)
        self.actors: list[_ActorState] = []
        for i in range(n):
            handle = cls.options(name=f"apex-actor-{i}").remote(
                cfg, i, eps[i % len(eps)].url, weight_store, n
            )
            self.actors.append(_ActorState(index=i, handle=handle))
        self.start_frames_each = max(0, int(start_frames)) // max(1, n)
        for a in self.actors:
            a.run_ref = a.handle.run.remote(schedule_frames=self.start_frames_each)
        self.episodes_total = 0
        self.eps_range = (float("nan"), float("nan"))

    def poll(self, timeout: float = 2.0) -> FleetStats:
        """Aggregate stats; restart ``run`` on actors whose loop ended.

        Raises `FleetError` when an actor cannot start or keeps failing."""
        for a in self.actors:
            if a.stats_ref is None:
                a.stats_ref = a.handle.stats.remote()
        refs = [a.stats_ref for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        ready_set = set(ready)
        episodes: list[tuple[float, int]] = []
        eps_lo, eps_hi = [], []
        for a in self.actors:
            if a.stats_ref not in ready_set:
                continue
            ref, a.stats_ref = a.stats_ref, None
            try:
                s = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                continue
            episodes += self._absorb(a, s)
            eps_lo.append(s.epsilon_min)
            eps_hi.append(s.epsilon_max)
        self._rerun_finished()
        self.episodes_total += len(episodes)
        if eps_lo:
            self.eps_range = (min(eps_lo), max(eps_hi))
        return FleetStats(
            **self._totals(),
            episodes=episodes,
            episodes_total=self.episodes_total,
            epsilon_min=self.eps_range[0],
            epsilon_max=self.eps_range[1],
            actor_weight_versions=[a.last.weight_version for a in self.actors if a.last],
            actor_restarts=sum(a.restarts for a in self.actors),
            writer_resets=sum(
                a.resets_base + (a.last.replay_resets if a.last else 0) for a in self.actors
            ),
        )

    def _rerun_finished(self) -> None:
        refs = [a.run_ref for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        done_set = set(done)
        for a in self.actors:
            if a.run_ref not in done_set:
                continue
            try:
                ray.get(a.run_ref)
                reason = "its run loop returned"
            except ray.exceptions.RayActorError as exc:
                if exc.actor_init_failed:  # Ray does not restart a failed constructor
                    raise FleetError(
                        f"actor {a.index} cannot start: {_cause(exc)}; check the game id, "
                        "the seed and the env settings"
                    ) from None
                reason = type(exc).__name__  # the process died; Ray restarts it
            except ray.exceptions.RayError as exc:  # run() raised: a bug or a broken env
                self._note_run_failure(a, exc)
                reason = f"run failed: {_cause(exc)}"
            a.reruns += 1
            log.warning("actor %d: %s; calling run again", a.index, reason)
            # The schedule goes on from this index's frames so far (the actor's
            # own counters start again at 0 when its process was restarted).
            a.run_ref = a.handle.run.remote(schedule_frames=self._schedule_frames(a))

    def _note_run_failure(self, a: _ActorState, exc: BaseException) -> None:
        frames = a.base["frames"] + (a.last.frames if a.last else 0)
        if frames > a.frames_at_failure:
            a.run_failures, a.frames_at_failure = 0, frames
        a.run_failures += 1
        if a.run_failures >= MAX_RUN_FAILURES:
            raise FleetError(
                f"actor {a.index} failed {a.run_failures} times in a row without progress: "
                f"{_cause(exc)}"
            )

    def _schedule_frames(self, a: _ActorState) -> int:
        return self.start_frames_each + a.base["frames"] + (a.last.frames if a.last else 0)

    def stop(self, timeout: float = 20.0) -> FleetStats:
        """Ask every actor to stop, collect final stats, then kill the actors."""
        for a in self.actors:
            try:
                a.handle.stop.remote()
            except ray.exceptions.RayError:
                pass
        refs = [a.run_ref for a in self.actors if a.run_ref is not None]
        deadline = time.time() + timeout
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.time()))
        for a in self.actors:
            a.stats_ref = None
        final = self._final_poll()
        for a in self.actors:
            ray.kill(a.handle, no_restart=True)
        if final.transitions_buffered:
            log.warning(
                "%d transitions were still in the actors' outboxes at stop (the replay did "
                "not take them in time): counted as dropped",
                final.transitions_buffered,
            )
            final.transitions_dropped += final.transitions_buffered
            final.transitions_buffered = 0
        return final

    def _final_poll(self) -> FleetStats:
        for a in self.actors:
            a.run_ref = None  # no reruns while stopping
        refs = {a.index: a.handle.stats.remote() for a in self.actors}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=5.0)
        episodes: list[tuple[float, int]] = []
        for a in self.actors:
            if refs[a.index] in ready:
                try:
                    s = ray.get(refs[a.index])
                except ray.exceptions.RayError:
                    continue
                episodes += self._absorb(a, s)
        self.episodes_total += len(episodes)
        return FleetStats(
            **self._totals(),
            episodes=episodes,
            episodes_total=self.episodes_total,
            actor_restarts=sum(a.restarts for a in self.actors),
        )

    @staticmethod
    def _absorb(a: _ActorState, s: ActorStats) -> list[tuple[float, int]]:
        """Take one stats answer; returns the episodes it reports. A new process
        (its counters began again, or another seed salt) is a restart; the
        transitions its outbox held at the last poll (up to a poll period old)
        count as dropped."""
        if a.last is not None and (s.frames < a.last.frames or s.seed_salt != a.last.seed_salt):
            for name in CUMULATIVE:  # the actor restarted: its counters began again
                a.base[name] += getattr(a.last, name)
            # what its outbox held at the last poll died with the process: lost
            a.base["transitions_dropped"] += a.last.transitions_buffered
            a.resets_base += a.last.replay_resets
            a.restarts += 1
        a.last = s
        return list(zip(s.episode_returns, s.episode_lengths, strict=False))

    def _totals(self) -> dict[str, int]:
        out = {
            name: sum(a.base[name] + (getattr(a.last, name) if a.last else 0) for a in self.actors)
            for name in CUMULATIVE
        }
        out["transitions_buffered"] = sum(
            a.last.transitions_buffered for a in self.actors if a.last
        )
        return out
