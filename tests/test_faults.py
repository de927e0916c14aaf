"""Real training runs survive real faults, and their summaries count what each cost.

Each test runs ``apex-dqn train`` (Pong, small settings) as a subprocess through
`bench.faults.TrainingRun` and injects faults by killing real processes (found
among the run's descendants) or by breaking a real redis-server the test owns.
After every fault the learner must go on updating (``prefetch + workers + 1``
updates more than at the fault, so at least one batch was sampled after it), and
each run must end by itself (``--max-seconds``) with exit status 0 and a summary
whose counters match what was injected.

About 12 minutes on 2 cores in all (marker ``e2e``: in the default suite, not in the
fast tier).
"""

from __future__ import annotations

import pytest

from bench.faults import RECOVERED, embedded_run, external_run

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_run_survives_its_redis_server_shard_actor_and_weight_store_being_killed(tmp_path):
    run, faults, _ = embedded_run(tmp_path, seconds=80)
    try:
        code, s = run.finish(timeout=240)
    finally:
        run.stop()
    log = run.text()
    assert code == 0, log[-4000:]
    assert [f["fault"] for f in faults] == [
        "kill -9 redis-server (embedded)",
        "kill -9 replay shard",
        "kill -9 actor",
        "kill -9 weight store",
    ]
    assert "restarted it on port" in log  # the driver's supervisor
    assert s["redis_restarts"] == 1 and s["shard_restarts"] == 1 and s["actor_restarts"] >= 1, s
    assert s["replay_outages"] >= 1 and s["replay_outage_s"] > 0, s
    assert s["updates"] >= faults[-1]["updates_at_fault"] + RECOVERED
    assert s["replay_resets"] == 0 and s["replay_rejected"] == 0, s
    # kill -9 of redis-server may lose what it had acknowledged but not yet
    # written (appendfsync everysec). The killed actor's outbox (what it had not
    # pushed yet: a push or two) is counted dropped, and counted lost; no outbox
    # overflowed (that would be thousands: the bound is 64 MB per actor).
    assert 0 <= s["transitions_dropped_by_actors"] < 1000, s
    assert s["transitions_lost_by_redis"] < 2_000, s
    lost = s["transitions_lost_by_redis"] + s["transitions_dropped_by_actors"]
    assert s["transitions_lost"] == lost, s
    assert "Traceback" not in log
    # the weight store came back: the actors act with weights published after it
    # (one a second), and no actor was restarted by its death (actor_restarts
    # counts only the one kill -9 of an actor)
    assert min(s["actor_weight_versions"]) >= s["weight_version"] - 15, s
    assert s["actor_restarts"] == 1, s


def test_run_survives_an_external_redis_down_full_readonly_losing_writes_and_back_empty(
    tmp_path,
):
    """Against a Redis the run does not own (`bench.faults.external_run`): a second
    run started on the live replay is refused (exit 2, naming this run's logdir);
    down 10 s; OOM 5 s; READONLY 5 s; its newest writes lost (AOF cut back ~10 s,
    mid-record, once the shard has stored transitions in that window), with an
    actor killed inside it so that its restarted writer's registration is lost
    too: the shard finds its index ahead of Redis, reloads and counts the lost
    transitions, and the writers go on; back empty: a reset, counted, and every
    writer registers again."""
    run, faults, _, server = external_run(tmp_path, seconds=110)
    try:
        code, s = run.finish(timeout=300)
    finally:
        run.stop()
        server.stop()
    log = run.text()
    assert code == 0, log[-4000:]
    second = faults[0]
    assert second["exit_code"] == 2, second
    assert "in use by another run" in second["output"], second
    assert str(tmp_path / "external") in second["output"], second  # names the holder
    assert "replay: unavailable" in log  # said in the progress line
    assert s["replay_resets"] == 1 and s["transitions_lost_in_resets"] > 0, s
    # down 10 s, OOM 5 s, READONLY 5 s; the two kills (lost writes, back empty) are
    # restarted within ~0.1 s and are counted only when a shard call falls inside
    assert s["replay_outages"] >= 3, s
    assert s["replay_outage_s"] >= 20, s
    assert faults[4]["aof_bytes_lost"] > 0, faults
    # counted, not silent: at least what the shard stored inside the lost window
    assert faults[4]["slots_written_in_window"] > 0, faults
    assert s["transitions_lost_by_redis"] >= faults[4]["slots_written_in_window"], (s, faults)
    assert s["replay_malformed"] == 0, s
    assert s["redis_restarts"] == 0 and s["shard_restarts"] == 0, s
    assert s["updates"] >= faults[-1]["updates_at_fault"] + RECOVERED
    # the actor killed inside the lost window: restarted, its writer registered
    # (an incarnation Redis then forgot); what its outbox held is counted dropped
    # (it may still hold a backlog from the OOM: pushes retry every 10 s at most)
    assert s["actor_restarts"] == 1 and faults[4]["incarnation_lost"] > 0, (s, faults)
    assert s["transitions_dropped_by_actors"] < 20_000, s
    lost = s["transitions_lost_by_redis"] + s["transitions_dropped_by_actors"]
    assert s["transitions_lost"] == lost, s
    assert s["writer_reregistrations"] >= 2, s  # both writers, after the empty restart
    assert "Traceback" not in log


def test_run_survives_a_network_partition_and_a_stopped_redis(tmp_path):
    """Jepsen-style: the run reaches its external Redis only through a TCP proxy.
    A partition that drops every packet for 35 s, then redis-server SIGSTOPped for
    35 s (both longer than the 30 s a call waits for its reply): the actors' env
    loops go on meanwhile (their pushes wait in their outboxes), the run comes
    back by itself, nothing is stored twice and nothing is lost uncounted
    (``bench/faults.py --only network`` runs 120 s and 60 s)."""
    from bench.faults import network_run

    run, faults, _, server, proxy = network_run(tmp_path, seconds=130, partition_s=35, stop_s=35)
    try:
        code, s = run.finish(timeout=300)
    finally:
        run.stop()
        proxy.close()
        server.stop()
    log = run.text()
    assert code == 0, log[-4000:]
    for f in faults:  # the env loops never waited on the hung Redis
        assert f["frames_during"] > 1000, faults
    assert "replay: unavailable" in log
    # The shard counts an outage when one of its own calls times out (30 s), from
    # when that call began. A reply lost while the lease was WATCHed came back as
    # redis-py's WatchError and went uncounted, with a traceback (CI, 2026-12-07);
    # `tests/test_lease.py` holds that case since.
    assert s["replay_outages"] >= 2 and s["replay_outage_s"] >= 60, s
    assert s["updates"] >= faults[-1]["updates_at_fault"] + RECOVERED
    assert s["replay_resets"] == 0 and s["replay_rejected"] == 0 and s["replay_malformed"] == 0, s
    # 2 actors x 4 envs for ~35 s: far below the 64 MB outage buffers, so nothing
    # was dropped, and a hang loses no acknowledged write
    assert s["transitions_dropped_by_actors"] == 0 and s["transitions_lost"] == 0, s
    assert "Traceback" not in log


def test_run_survives_full_disks_under_its_logdir_and_its_redis(tmp_path, tmpfs):
    """The logdir on a small tmpfs that fills (checkpoints every 6 s fail, counted,
    training goes on, the last good checkpoint kept), then the external Redis's
    data dir on another that fills: Redis refuses writes with MISCONF, an outage;
    space comes back and the run goes on, nothing lost (`bench.faults.disk_run`)."""
    from bench.faults import disk_run
    from learner.checkpoint import load_checkpoint

    log_disk, redis_disk = tmpfs("256m"), tmpfs("512m")
    run, faults, _, server = disk_run(tmp_path, log_disk, redis_disk, seconds=75)
    try:
        code, s = run.finish(timeout=300)
    finally:
        run.stop()
        server.stop()
    log = run.text()
    assert code == 0, log[-4000:]
    assert "checkpoint not written" in log and "No space left on device" in log
    assert faults[0]["updates_while_full"] >= 20, faults  # trained on, disk full
    assert s["checkpoint_failures"] >= 1, s
    assert "MISCONF" in log and "replay: unavailable" in log
    assert s["replay_outages"] >= 1 and s["replay_outage_s"] > 0, s
    assert s["updates"] >= faults[-1]["updates_at_fault"] + RECOVERED
    # the checkpoint written at exit, with space back, is whole and the newest
    assert load_checkpoint(s["checkpoint"])["counters"]["updates"] == s["updates"]
    assert not list((log_disk / "run").glob("*.tmp-*"))
    assert s["transitions_lost"] == 0 and s["transitions_dropped_by_actors"] == 0, s
    assert s["replay_resets"] == 0 and s["replay_rejected"] == 0 and s["replay_malformed"] == 0, s
    assert "Traceback" not in log


def test_a_killed_driver_leaves_nothing_behind_and_resume_continues_its_run(tmp_path):
    """kill -9 of ``apex-dqn train`` itself, mid-run: its local Ray and its embedded
    redis-server go with it (nothing of the run is left two minutes later), and
    ``train --resume LOGDIR/checkpoint.pt`` in the same logdir takes the logdir
    lock and the replay's lease over, reloads the replay from the AOF, continues
    from the checkpoint's counters and ends by itself (``bench/faults.py --only
    driver`` measures the same)."""
    from bench.faults import driver_kill_run, leftovers

    first, second, info = driver_kill_run(tmp_path, resume_seconds=25)
    try:
        code, s = second.finish(timeout=240)
        left, _ = leftovers(info, within_s=120)  # Ray's agents take ~70 s
    finally:
        first.stop()
        second.stop()
    log = second.text()
    assert left == [], left  # Ray's processes and redis-server share the driver's fate
    assert code == 0, log[-4000:]
    assert "Traceback" not in log and "Traceback" not in first.text()
    # the replay came back from the embedded server's AOF, not refilled: the
    # resumed run's first progress line shows (nearly) the size it had, far more
    # than 2 actors x 4 envs insert in the second before it
    assert info["replay_before_kill"] and info["replay_at_resume"], info
    assert info["replay_at_resume"] >= 0.9 * info["replay_before_kill"] > 5000, info
    assert s["updates"] > info["checkpoint_updates"] + RECOVERED, (s, info)
    assert s["replay_resets"] == 0 and s["transitions_lost_by_redis"] == 0, s
