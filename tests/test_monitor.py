"""`deploy.monitor.fault_counts` on tiny hand-made figures: what a run reports lost.

The shards' counters count from the run's start (baseline); pushes Redis
acknowledged that no shard received count as lost by Redis only once the shards
have drained. Before that they are mostly pushes in flight, and a healthy run
must not report them: `transitions_lost` is a Prometheus counter (never goes
back), and runs before this fix showed 400 lost transitions (one push in
flight) in healthy runs.
"""

from __future__ import annotations

from deploy.fleet import FleetStats
from deploy.monitor import fault_counts
from replay_server.protocol import ShardStats


def test_pushes_in_flight_are_not_lost_while_the_run_goes_on():
    fleet = FleetStats(transitions_pushed=10_400, transitions_dropped=0)
    shards = [ShardStats(received=6_000), ShardStats(received=4_000)]  # one push of 400 in flight
    base = [ShardStats(), ShardStats()]
    live = fault_counts(fleet, shards, base, drained=False)
    assert live["transitions_lost"] == 0 and live["transitions_lost_by_redis"] == 0


def test_after_the_drain_acknowledged_pushes_no_shard_received_are_lost_by_redis():
    fleet = FleetStats(transitions_pushed=10_400, transitions_dropped=32, writer_resets=3)
    # shard 1's Redis lost 300 stored transitions and a push of 400 still in its incoming list
    shards = [ShardStats(received=6_000), ShardStats(received=4_100, lost=300, outages=1)]
    base = [ShardStats(), ShardStats(received=100)]  # it had received 100 before the run
    end = fault_counts(fleet, shards, base, drained=True, shard_restarts=1, redis_restarts=2)
    assert end["transitions_lost_by_redis"] == 300 + 400
    assert end["transitions_dropped_by_actors"] == 32
    assert end["transitions_lost"] == 32 + 300 + 400
    assert end["replay_outages"] == 1
    assert (end["shard_restarts"], end["redis_restarts"]) == (1, 2)
    assert end["writer_reregistrations"] == 3


def test_a_shard_without_a_baseline_is_not_reconciled():
    """A shard that had no stats at the start (it was down): its `received` from
    before the run is unknown, so no difference is taken."""
    fleet = FleetStats(transitions_pushed=1_000)
    shards = [ShardStats(received=500), ShardStats(received=200)]
    end = fault_counts(fleet, shards, [ShardStats(), None], drained=True)
    assert end["transitions_lost"] == 0
