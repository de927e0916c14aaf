"""Ray wiring of the plain role classes: named actors, restarts, stats.

The role classes (`actors.actor.ApexActor`, `replay_server.shard.ReplayShard`,
`common.weights.WeightStore`) know nothing of Ray; this module makes them Ray
actors with clear names (they show in the Ray dashboard under these names):

  apex-weights        WeightStore, num_cpus=0, on the driver's node
  apex-replay-<k>     ReplayShard k, num_cpus=0, on the driver's node
  apex-actor-<i>      ApexActor i, num_cpus=1, max_restarts=-1 (a crash or kill -9
                      restarts it with the same index, hence the same epsilons,
                      and a decaying epsilon schedule goes on where it was)

`ActorFleet.poll()` collects stats from every actor without blocking for long,
notices restarted actors (their ``run`` call fails with ActorDiedError or returns
early) and calls ``run`` again, and keeps cumulative counters across restarts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from common.config import Config

log = logging.getLogger("apex.fleet")

# our counter name -> the actor's stats() key
COUNTERS = {
    "frames": "frames",
    "env_steps": "env_steps",
    "transitions": "transitions_pushed",
    "dropped": "transitions_dropped",
    "push_failures": "pushes_failed",
}
WEIGHTS_NAME = "apex-weights"


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

    cls = ray.remote(num_cpus=0, max_concurrency=4)(WeightStore)
    return cls.options(name=WEIGHTS_NAME, scheduling_strategy=driver_node_strategy()).remote()


def start_shards(cfg: Config, urls: list[str], capacity_per_shard: int) -> list[Any]:
    from replay_server.shard import ReplayShard

    cls = ray.remote(num_cpus=0, max_concurrency=8)(ReplayShard)
    handles = []
    for k, url in enumerate(urls):
        h = cls.options(name=f"apex-replay-{k}", scheduling_strategy=driver_node_strategy()).remote(
            url, capacity_per_shard, alpha=cfg.replay.alpha, codec=cfg.replay.codec
        )
        handles.append(h)
    ray.get([h.start.remote() for h in handles])
    return handles


@dataclass
class _ActorState:
    index: int
    handle: Any
    run_ref: Any = None
    last: dict = field(default_factory=dict)
    base: dict = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    restarts: int = 0
    stats_ref: Any = None


class ActorFleet:
    """Starts, watches and stops the ``apex-actor-<i>`` Ray actors."""

    def __init__(
        self,
        cfg: Config,
        urls: list[str],
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
                cfg, i, urls[i % len(urls)], weight_store, n
            )
            self.actors.append(_ActorState(index=i, handle=handle))
        self.start_frames_each = max(0, int(start_frames)) // max(1, n)
        for a in self.actors:
            a.run_ref = a.handle.run.remote(schedule_frames=self.start_frames_each)
        self.episodes_total = 0
        self.eps_range = (float("nan"), float("nan"))

    def poll(self, timeout: float = 2.0) -> dict:
        """Aggregate stats; restart ``run`` on actors whose loop ended."""
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
            if "epsilon_min" in s:
                eps_lo.append(s["epsilon_min"])
                eps_hi.append(s["epsilon_max"])
        self._rerun_finished()
        totals = self._totals()
        self.episodes_total += len(episodes)
        if eps_lo:
            self.eps_range = (min(eps_lo), max(eps_hi))
        versions = [a.last.get("weight_version", -1) for a in self.actors if a.last]
        return {
            **totals,
            "episodes": episodes,
            "episodes_total": self.episodes_total,
            "epsilon_min": self.eps_range[0],
            "epsilon_max": self.eps_range[1],
            "actor_weight_versions": versions,
            "actor_restarts": sum(a.restarts for a in self.actors),
        }

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
            except ray.exceptions.RayError as exc:
                reason = type(exc).__name__
            a.restarts += 1
            log.warning("actor %d: %s; calling run again (restart %d)", a.index, reason, a.restarts)
            # The schedule goes on from this index's frames so far (the actor's
            # own counters start again at 0 when its process was restarted).
            a.run_ref = a.handle.run.remote(schedule_frames=self._schedule_frames(a))

    def _schedule_frames(self, a: _ActorState) -> int:
        return self.start_frames_each + a.base["frames"] + int(a.last.get("frames", 0))

    def stop(self, timeout: float = 20.0) -> dict:
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
        return final

    def _final_poll(self) -> dict:
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
        return {**self._totals(), "episodes": episodes, "episodes_total": self.episodes_total}

    @staticmethod
    def _absorb(a: _ActorState, s: dict) -> list[tuple[float, int]]:
        """Take one stats answer; returns the episodes it reports."""
        if a.last and s.get("frames", 0) < a.last.get("frames", 0):
            for ours, theirs in COUNTERS.items():  # the actor restarted: counters began again
                a.base[ours] += a.last.get(theirs, 0)
        a.last = s
        return list(zip(s.get("episode_returns", []), s.get("episode_lengths", []), strict=False))

    def _totals(self) -> dict:
        return {
            ours: sum(a.base[ours] + a.last.get(theirs, 0) for a in self.actors)
            for ours, theirs in COUNTERS.items()
        }
