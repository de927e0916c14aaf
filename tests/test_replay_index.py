"""ReplayIndex: the replay's in-memory index as pure logic, with hand-made pushes
(wire-encoded as an actor would) and no Redis."""

from __future__ import annotations

import numpy as np
import pytest

from common.types import TransitionBatch, make_frame_id
from common.wire import encode_batch
from replay_server.frame_groups import FrameGroups
from replay_server.index import ReplayIndex
from replay_server.records import RECORD_DTYPE, SLOT_BITS

INC = 1  # the writer incarnation of every push here


def push(start: int, n: int, prio: float = 1.0, action: int = 1, fresh: bool = True) -> bytes:
    """n transitions over frames start..start+n+6 (stack of 4, s' one step on);
    the push stores those frames as new when ``fresh``."""
    fid = make_frame_id(INC, np.arange(start, start + n + 7, dtype=np.int64))
    obs = np.stack([fid[i : i + 4] for i in range(n)])
    nxt = np.stack([fid[i + 1 : i + 5] for i in range(n)])
    batch = TransitionBatch(
        obs_ids=obs,
        next_obs_ids=nxt,
        actions=np.full(n, action, np.int64),
        returns=np.arange(n, dtype=np.float32),
        discounts=np.full(n, 0.97, np.float32),
        priorities=np.full(n, prio, np.float32),
    )
    return encode_batch(batch, actor=0, policy_version=0, frame_ids=fid if fresh else None)


def ingest(ix: ReplayIndex, *pushes: bytes, incarnation: int = INC):
    plan = ix.plan(list(pushes), incarnation)
    ix.apply(plan)
    return plan


def test_plan_changes_nothing_until_applied() -> None:
    ix = ReplayIndex(100, seed=0)
    plan = ix.plan([push(0, 10)], INC)
    assert (ix.size, ix.tree.total, ix.counters["inserted_total"]) == (0, 0.0, 0)
    assert len(ix.sample(4)) == 0
    assert plan.next == 10 and plan.counts["inserted_total"] == 10
    ix.apply(plan)
    assert ix.size == 10 and ix.counters["inserted_total"] == 10
    assert ix.groups.frame_count == 17
    assert ix.meta()["next_slot"] == 10


def test_sample_follows_priorities_and_returns_the_records() -> None:
    ix = ReplayIndex(100, alpha=1.0, seed=1)
    ingest(ix, push(0, 10, prio=1.0), push(100, 10, prio=9.0, action=2))
    s = ix.sample(20_000)
    heavy = (s.actions == 2).mean()
    assert heavy == pytest.approx(0.9, abs=0.01)  # 10*9 / (10*1 + 10*9)
    assert s.total == pytest.approx(100.0)
    assert set(np.unique(s.keys)) == set(range(20))
    first = s.keys == 3
    assert (s.obs_ids[first][0] == make_frame_id(INC, np.arange(3, 7))).all()
    assert (s.next_obs_ids[first][0] == make_frame_id(INC, np.arange(4, 8))).all()
    assert s.returns[first][0] == 3.0 and s.discounts[first][0] == pytest.approx(0.97)
    assert ix.sampled_total == 20_000


def test_fifo_eviction_frees_frames_no_live_slot_refers_to() -> None:
    ix = ReplayIndex(20, seed=0)
    ingest(ix, push(0, 10))
    ingest(ix, push(100, 10))
    assert ix.size == 20 and ix.groups.frame_count == 34
    plan = ingest(ix, push(200, 10))
    assert (ix.first, ix.next, ix.size) == (10, 30, 20)
    assert ix.counters["evictions"] == 10
    (p,) = plan.pushes
    assert np.array_equal(np.sort(p.freed), make_frame_id(INC, np.arange(0, 17)))
    assert set(ix.sample(1000).keys.tolist()) <= set(range(10, 30))
    assert np.array_equal(p.pos, np.arange(20, 30) % 20)


def test_bad_records_and_strangers_are_refused() -> None:
    ix = ReplayIndex(100, num_actions=4, seed=0)
    bad_action = push(0, 5, action=7)
    nan_prio = push(100, 5, prio=float("nan"))
    plan = ingest(ix, bad_action, nan_prio, b"not msgpack", push(200, 5), incarnation=INC)
    assert plan.counts["rejected"] == 10 and plan.counts["malformed"] == 1
    assert ix.size == 5 and ix.counters["inserted_total"] == 5
    # frames of an incarnation newer than the namespace's: not one registered writer
    plan = ix.plan([push(300, 5)], incarnation=0)
    assert plan.counts["rejected"] == 5 and plan.next == ix.next


def test_transitions_whose_frames_nobody_stored_are_dangling() -> None:
    ix = ReplayIndex(100, seed=0)
    plan = ingest(ix, push(0, 5, fresh=False))
    assert plan.counts["dangling"] == 5 and ix.size == 0


def test_priorities_remove_and_evicted_keys() -> None:
    ix = ReplayIndex(10, alpha=1.0, seed=0)
    ingest(ix, push(0, 10))
    shard_bits = 3 << SLOT_BITS  # the sampler's shard index above the slot
    assert ix.update_priorities(np.array([2, 3]) | shard_bits, np.array([5.0, np.nan])) == 1
    assert ix.get_priorities(np.array([2, 3]))[0] == 5.0
    assert ix.tree.total == pytest.approx(9 + 5.0)
    assert ix.remove(np.array([2, 2, 4])) == 2 and ix.removed == 2
    assert not {2, 4} & set(ix.sample(2000).keys.tolist())
    ingest(ix, push(100, 5))  # slots 0-4 evicted
    assert ix.update_priorities(np.array([0, 12]), np.array([1.0, 1.0])) == 1
    assert np.isnan(ix.get_priorities(np.array([0]))).all()


def test_priorities_blob_round_trips_through_load() -> None:
    ix = ReplayIndex(16, alpha=0.5, seed=0)
    plan = ingest(ix, push(0, 12))
    ix.update_priorities(np.arange(12), np.linspace(1, 12, 12))
    blob = ix.priorities_blob()
    # what the Redis holds: the records (initial priorities) and the groups hash
    rec = np.zeros(16, RECORD_DTYPE)
    for p in plan.pushes:
        rec[p.pos] = p.rec
    gid, ids, _ = plan.pushes[0].added
    groups = {str(gid).encode(): FrameGroups.pack(ids, 11)}
    other = ReplayIndex(16, alpha=0.5, seed=0)
    report = other.load(rec, 0, 12, ix.meta(), blob, groups)
    assert (report.bad_groups, report.bad_records, report.dangling) == (0, 0, 0)
    assert np.allclose(other.get_priorities(np.arange(12)), np.linspace(1, 12, 12))
    assert other.tree.total == pytest.approx(ix.tree.total)
    assert other.counters == ix.counters


def test_load_gives_bad_records_weight_zero_and_drops_bad_groups() -> None:
    ix = ReplayIndex(8, seed=0)
    plan = ingest(ix, push(0, 8))
    rec = np.zeros(8, RECORD_DTYPE)
    rec[plan.pushes[0].pos] = plan.pushes[0].rec
    rec["action"][3] = -1  # corrupt
    rec["ret"][5] = np.inf
    gid, ids, _ = plan.pushes[0].added
    groups = {str(gid).encode(): FrameGroups.pack(ids, 7), b"x": b"junk"}
    other = ReplayIndex(8, num_actions=4, seed=0)
    report = other.load(rec, 0, 8, ix.meta(), None, groups)
    assert (report.bad_groups, report.bad_records) == (1, 2)
    assert not {3, 5} & set(other.sample(5000).keys.tolist())
    assert other.counters["rejected"] == ix.counters["rejected"] + 2


def test_evict_all_keeps_slots_monotonic() -> None:
    ix = ReplayIndex(10, seed=0)
    ingest(ix, push(0, 6))
    assert ix.evict_all() == 6
    assert (ix.first, ix.next, ix.size, ix.groups.frame_count) == (6, 6, 0, 0)
    assert ix.counters["lost_in_resets"] == 6 and ix.counters["resets"] == 1
    assert ix.update_priorities(np.array([1]), np.array([1.0])) == 0


def test_skipped_slots_are_never_reused_nor_sampled() -> None:
    """After Redis lost its newest writes the shard skips the lost slots: a key
    drawn before the loss can never name another transition."""
    ix = ReplayIndex(20, alpha=1.0, seed=0)
    groups = {}
    for p in ingest(ix, push(0, 8)).pushes:
        groups[str(p.added[0]).encode()] = FrameGroups.pack(p.added[1], p.group_created)
    ix.apply(ix.plan_skip(12))  # slots 8..11 were lost
    assert (ix.first, ix.next, ix.size) == (0, 12, 8)
    assert ix.update_priorities(np.array([9, 10]), np.array([5.0, 5.0])) == 0  # late updates
    assert not {8, 9, 10, 11} & set(ix.sample(4000).keys.tolist())
    plan = ingest(ix, push(100, 4))
    assert plan.pushes[0].pos.tolist() == [12, 13, 14, 15] and ix.size == 12
    for p in plan.pushes:
        groups[str(p.added[0]).encode()] = FrameGroups.pack(p.added[1], p.group_created)
    # read back from storage: the skipped records are empty, neither dangling nor stored
    other = ReplayIndex(20, alpha=1.0, seed=0)
    report = other.load(ix.rec.copy(), ix.first, ix.next, ix.meta(), ix.priorities_blob(), groups)
    assert (report.dangling, report.bad_records, other.size) == (0, 0, 12)
    ingest(ix, push(200, 10))  # next 26, first 6: the skipped range is still live
    assert (ix.first, ix.size) == (6, 16)
    ingest(ix, push(300, 8))  # first 14: evicted
    assert (ix.first, ix.size) == (14, 20)


def test_removed_slots_stay_out() -> None:
    """A priority update that arrives after `remove` does not bring the row back."""
    ix = ReplayIndex(10, alpha=1.0, seed=0)
    ingest(ix, push(0, 5))
    assert ix.remove(np.array([3])) == 1
    assert ix.update_priorities(np.array([3, 4]), np.array([9.0, 9.0])) == 1
    assert 3 not in set(ix.sample(2000).keys.tolist())
