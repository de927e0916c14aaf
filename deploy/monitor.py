"""What the training loop learns about the other roles: `RunMonitor`.

``backend`` is the launcher's `deploy.launcher.ReplayBackend` (Redis restarts).
Polled in the loop's background thread (`learner.loop.TrainLoop`
``poll_external``); the same code watches the Ray fleets (`deploy.fleet`) and
the in-process ones (`deploy.inprocess`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from learner.background import RunStatus

log = logging.getLogger(__name__)


class RunMonitor:
    """What the training loop learns about the other roles, polled in the loop's
    background thread (`learner.loop.TrainLoop` ``poll_external``): actor totals
    and episodes, replay size and health; and what every fault cost, for the
    summary. (It does not pace anything: the replay ratio is the sampler's
    `ReplayRatioKeeper`.)

    A role that cannot run (`deploy.fleet.FleetError`), or a replay unavailable
    for longer than ``max_outage_s`` (``--max-outage-minutes``; 0: no limit), sets
    ``error`` and the stop event: the loop ends cleanly and `train` reports it
    (exit 1). ``data`` is the learner's `DataSource`: its own wait for an
    unavailable replay (a dead shard actor included, which reports no stats) goes
    into ``replay_unavailable_s`` and is what the deadline measures.
    """

    def __init__(
        self,
        actors: Any,
        replay: Any,
        backend: Any,
        data: Any,
        stop: threading.Event,
        max_outage_s: float = 0.0,
    ) -> None:
        self.actors, self.replay, self.backend = actors, replay, backend
        self.data, self._stop = data, stop
        self.max_outage_s = float(max_outage_s)
        self.error: BaseException | None = None
        self.fleet: Any = None
        self.shards: list[Any] = []
        self.drained = False  # `final` ran: the actors stopped, the shards drained

    def poll(self) -> RunStatus:
        from deploy.fleet import FleetError

        try:
            self.fleet = self.actors.poll(timeout=1.0)
            self.shards = [s for s in self.replay.stats() if s is not None]
        except FleetError as exc:
            if self.error is None:
                self.error = exc
                log.error("%s", exc)
                self._stop.set()
            raise
        f, shards = self.fleet, self.shards
        down = [s.outage_s for s in shards if not s.available]
        status = self.data.status()
        waiting = status.unavailable_s  # the learner's own view (a dead shard too)
        if waiting is not None:
            down.append(waiting)
        # the current outage: a shard's own, or the learner's wait
        now_down = max([s.down_s for s in shards if not s.available] + [waiting or 0.0])
        if self.max_outage_s and now_down > self.max_outage_s and self.error is None:
            why = status.last_outage or "a replay shard cannot reach its Redis"
            self.error = RuntimeError(
                f"the replay has been unavailable for {now_down / 60:.1f} minutes, longer "
                f"than --max-outage-minutes {self.max_outage_s / 60:g} ({why}); the "
                "checkpoint is written: bring the replay back and --resume"
            )
            log.error("%s", self.error)
            self._stop.set()
        return RunStatus(
            frames=f.frames,
            transitions=f.transitions_pushed,
            episodes=f.episodes,
            epsilon_min=f.epsilon_min,
            epsilon_max=f.epsilon_max,
            actor_weight_versions=f.actor_weight_versions,
            replay_size=sum(s.size for s in shards),
            replay_inserted=sum(s.inserted_total for s in shards),
            replay_bytes=sum(s.bytes_used for s in shards),
            replay_unavailable_s=max(down) if down else None,
            faults=self._faults(),
        )

    def final(self) -> None:
        """Last figures after the actors stopped and the shards drained; from here
        on, pushes Redis acknowledged that no shard received count as lost."""
        try:
            self.shards = [s for s in self.replay.stats(timeout=5.0) if s is not None]
        except Exception as exc:  # noqa: BLE001 - the summary uses the last figures
            log.warning("final replay stats: %s", exc)
        if self.fleet is not None:
            self.fleet.actor_restarts = max(
                self.fleet.actor_restarts, sum(a.restarts for a in self.actors.actors)
            )
        self.drained = True

    def _faults(self) -> dict[str, Any]:
        """What faults cost in this run (`fault_counts` of the last figures)."""
        return fault_counts(
            self.fleet,
            self.shards,
            self.replay.baseline(),
            drained=self.drained,
            shard_restarts=self.replay.restarts,
            redis_restarts=self.backend.restarts,
        )

    def summary(self) -> dict[str, Any]:
        f, shards = self.fleet, self.shards
        return {
            "replay_size": sum(s.size for s in shards),
            "replay_inserted": sum(s.inserted_total for s in shards),
            "replay_bytes": sum(s.bytes_used for s in shards),
            "actor_weight_versions": f.actor_weight_versions if f else [],
            **self._faults(),
        }


def fault_counts(
    fleet: Any,
    shards: list[Any],
    baseline: list[Any],
    drained: bool,
    shard_restarts: int = 0,
    redis_restarts: int = 0,
) -> dict[str, Any]:
    """What faults cost in this run: the shards' counters (`ShardStats`) as
    differences from ``baseline`` (the same shards' stats at the run's start; None
    for a shard that had none), with the actors' totals (`FleetStats`, or None).

    ``transitions_lost`` = dropped by the actors + lost by Redis, where lost by
    Redis also holds, once the shards have ``drained``, the pushes Redis
    acknowledged that no shard ever received (lost with Redis's newest writes
    while still in a shard's incoming list). Before that the difference is
    mostly pushes in flight (up to one push per actor, 400 transitions at the
    defaults), and `transitions_lost` is a Prometheus counter that never goes
    back, so it is left out.
    """
    base = {i: b for i, b in enumerate(baseline) if b is not None}

    def delta(name: str) -> int:
        return sum(getattr(s, name) - getattr(base.get(i, s), name) for i, s in enumerate(shards))

    dropped = fleet.transitions_dropped if fleet else 0
    lost = delta("lost")
    unaccounted = 0
    if drained and fleet is not None and len(base) == len(shards):
        unaccounted = max(0, fleet.transitions_pushed - delta("received"))
    return {
        "replay_outages": delta("outages"),
        "replay_outage_s": round(
            sum(s.outage_s - base.get(i, s).outage_s for i, s in enumerate(shards)), 1
        ),
        "transitions_lost": dropped + lost + unaccounted,
        "transitions_dropped_by_actors": dropped,
        "transitions_lost_by_redis": lost + unaccounted,
        "replay_resets": delta("resets"),
        "transitions_lost_in_resets": delta("lost_in_resets"),
        "orphan_frames_collected": delta("orphans_collected"),
        "replay_rejected": delta("rejected"),
        "replay_malformed": delta("malformed"),
        "shard_restarts": shard_restarts,
        "actor_restarts": fleet.actor_restarts if fleet else 0,
        "writer_reregistrations": fleet.writer_resets if fleet else 0,
        "redis_restarts": redis_restarts,
    }
