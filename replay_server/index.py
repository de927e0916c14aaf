"""The replay's in-memory index: pure data structure, no Redis, no threads.

One shard's view of its FIFO ring of ``capacity`` transitions:

* slots are monotonic integers; live slots are ``[first, next)`` and slot ``s``
  sits at ring position ``s % capacity``;
* ``rec``: the 80-byte records (`replay_server.records.RECORD_DTYPE`) by position;
* ``prio`` and a sum tree of ``prio**alpha`` (prioritized sampling);
* ``groups``: which stored frames live slots still refer to
  (`replay_server.frame_groups.FrameGroups`);
* ``counters``: the replay's counters (the ones ``P meta`` stores, see `COUNTERS`).

An ingest round is two steps, so that memory never runs ahead of Redis:
`ReplayIndex.plan` decodes and validates pushes and computes the new index on
copies (nothing changes), the shard writes what the plan says in one MULTI/EXEC,
and only then `ReplayIndex.apply` makes the plan the index. `ReplayIndex.load`
rebuilds the index from what a Redis returned, defensively.

Thread-safe for one planner/applier (the shard's ingest lock) and any number of
concurrent samplers: everything a sampler reads or writes is under ``lock``.
Unit tests drive it with hand-made pushes (tests/test_replay_index.py).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import numpy as np

from common.types import STACK
from common.wire import WireError, decode_batch
from replay_server.frame_groups import FrameGroups
from replay_server.protocol import ShardSample
from replay_server.records import (
    MAX_ACTIONS,
    MAX_PRIORITY,
    MIN_PRIORITY,
    RECORD_DTYPE,
    SLOT_BITS,
    records_ok,
    stored_ok,
    writer_frames_ok,
)
from replay_server.sum_tree import SumTree

log = logging.getLogger(__name__)

# counters kept in ``P meta`` (besides capacity, first_slot, next_slot, next_gid)
COUNTERS = (
    "received",
    "inserted_total",
    "evictions",
    "malformed",
    "rejected",
    "dangling",
    "lost",
    "resets",
    "lost_in_resets",
    "orphans_collected",
    "outages",
    "outage_ms",
)


@dataclass
class PushPlan:
    """What one push does to storage (the shard turns it into Redis commands).

    pos / rec:      ring positions written and their records
    added:          `FrameGroups.add`'s result for the push's new frames (None: none)
    group_created:  the slot stored with the new group
    freed_gids / freed: groups no live slot refers to any more, and their frame ids
    dead:           the records are empty placeholders of skipped slots (weight 0)
    """

    pos: np.ndarray
    rec: np.ndarray
    added: tuple[int, np.ndarray, list[int]] | None
    group_created: int
    freed_gids: list[int]
    freed: np.ndarray
    dead: bool = False  # slots skipped, not stored: weight 0 (`ReplayIndex.plan_skip`)


@dataclass
class Plan:
    """One ingest round computed on copies; `ReplayIndex.apply` makes it the index."""

    groups: FrameGroups
    first: int
    next: int
    pushes: list[PushPlan] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    skipped: tuple[int, int] | None = None  # slots [a, b) skipped (`ReplayIndex.plan_skip`)

    def count(self, name: str, n: int) -> None:
        self.counts[name] = self.counts.get(name, 0) + int(n)


@dataclass
class LoadReport:
    """What `ReplayIndex.load` had to leave out."""

    bad_groups: int = 0
    bad_records: int = 0
    dangling: int = 0


class ReplayIndex:
    """Records, priorities and frame lifetimes of one shard's ring (see the module)."""

    def __init__(
        self,
        capacity: int,
        alpha: float = 0.6,
        num_actions: int = MAX_ACTIONS,
        seed: int | None = None,
    ) -> None:
        if capacity < 1 or capacity >= 1 << 40:
            raise ValueError(f"capacity={capacity} must be in [1, 2**40)")
        self.capacity = int(capacity)
        self.alpha = float(alpha)
        self.num_actions = int(num_actions)
        self.lock = threading.Lock()
        self._rng = np.random.default_rng(seed)
        self.rec = np.zeros(self.capacity, RECORD_DTYPE)
        self.prio = np.zeros(self.capacity, np.float32)
        self.tree = SumTree(self.capacity)
        self.groups = FrameGroups()
        self.first = 0  # oldest live slot
        self.next = 0  # next slot to assign
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.sampled_total = 0
        self.removed = 0
        self._skipped: list[tuple[int, int]] = []  # slot ranges skipped, not yet evicted

    @property
    def size(self) -> int:
        """Transitions stored: live slots but the skipped ones (`plan_skip`)."""
        gap = sum(max(0, min(b, self.next) - max(a, self.first)) for a, b in self._skipped)
        return self.next - self.first - gap

    # ---- ingest: plan on copies, apply once storage accepted -----------------
    def plan(self, raw: list[bytes], incarnation: int) -> Plan:
        """Decode and validate pushes (wire format, `common.wire.encode_batch`) and
        compute the index after them; nothing changes here. ``incarnation``: the
        newest writer registered in the namespace (older or newer ids are refused)."""
        cap = self.capacity
        plan = Plan(groups=self.groups.copy(), first=self.first, next=self.next)
        for item in raw:
            try:
                meta, batch = decode_batch(item)
            except WireError as exc:
                plan.count("malformed", 1)
                log.warning("skipping malformed replay entry (%d bytes): %s", len(item), exc)
                continue
            fids = meta["frame_ids"]
            plan.count("received", len(batch))
            if not writer_frames_ok(fids, incarnation):
                plan.count("rejected", len(batch))
                log.warning(
                    "rejecting a push whose %d new frame ids are not one writer's run", len(fids)
                )
                continue
            nxt0 = plan.next
            added = plan.groups.add(fids, nxt0 + len(batch) - 1)
            ids = np.concatenate([batch.obs_ids, batch.next_obs_ids], axis=1)
            rows = plan.groups.lookup(ids.ravel()).reshape(ids.shape)
            known = (rows >= 0).all(axis=1)
            valid = records_ok(batch, self.num_actions)
            plan.count("dangling", (~known & valid).sum())
            plan.count("rejected", (~valid).sum())
            good = known & valid
            k = int(good.sum())
            if k > cap:  # a push bigger than the replay: only its newest fit
                good[np.flatnonzero(good)[: k - cap]] = False
                plan.count("evictions", k - cap)
                k = cap
            slots = nxt0 + np.arange(k, dtype=np.int64)
            plan.groups.touch(rows[good].ravel(), np.repeat(slots, 2 * STACK))
            rec = np.zeros(k, RECORD_DTYPE)
            rec["ids"] = ids[good]
            rec["action"] = batch.actions[good]
            rec["ret"] = batch.returns[good]
            rec["disc"] = batch.discounts[good]
            rec["prio"] = batch.priorities[good]
            plan.next = nxt0 + k
            evict = max(0, plan.next - plan.first - cap)
            plan.first += evict
            plan.count("evictions", evict)
            plan.count("inserted_total", k)
            freed_gids, freed = plan.groups.release(plan.first)
            plan.pushes.append(PushPlan(slots % cap, rec, added, plan.next - 1, freed_gids, freed))
        return plan

    def plan_skip(self, nxt: int) -> Plan:
        """A plan that moves the next slot forward to ``nxt`` without storing
        anything: the skipped slots hold empty records of weight 0 and are evicted
        in turn. Used after Redis lost its newest writes, so that slot numbers are
        never reused: a key the sampler drew before the loss can then never name
        another transition (a late `remove` or priority update of it is ignored)."""
        plan = Plan(groups=self.groups.copy(), first=self.first, next=self.next)
        if nxt <= self.next:
            return plan
        plan.first = max(self.first, nxt - self.capacity)
        plan.count("evictions", plan.first - self.first)
        plan.next = nxt
        slots = np.arange(max(self.next, plan.first), nxt, dtype=np.int64)
        plan.skipped = (self.next, nxt)
        freed_gids, freed = plan.groups.release(plan.first)
        plan.pushes.append(
            PushPlan(
                slots % self.capacity,
                np.zeros(slots.size, RECORD_DTYPE),
                None,
                0,
                freed_gids,
                freed,
                dead=True,
            )
        )
        return plan

    def apply(self, plan: Plan) -> None:
        """Make an accepted plan the index (call in the order the plans were made)."""
        with self.lock:
            for push in plan.pushes:
                self.rec[push.pos] = push.rec
                pr = np.clip(push.rec["prio"].astype(np.float64), MIN_PRIORITY, MAX_PRIORITY)
                self.prio[push.pos] = 0.0 if push.dead else pr
                self.tree.update(push.pos, np.zeros(pr.size) if push.dead else pr**self.alpha)
            self.groups = plan.groups
            self.first, self.next = plan.first, plan.next
            if plan.skipped is not None:
                self._skipped.append(plan.skipped)
            self._skipped = [(a, b) for a, b in self._skipped if b > self.first]
            for name, n in plan.counts.items():
                self.counters[name] += n

    def meta(self, plan: Plan | None = None) -> dict[str, int]:
        """The ``P meta`` fields of the index (after ``plan``, when given)."""
        counts = plan.counts if plan is not None else {}
        groups = plan.groups if plan is not None else self.groups
        return {
            "next_slot": plan.next if plan is not None else self.next,
            "first_slot": plan.first if plan is not None else self.first,
            "next_gid": groups.next_gid,
            **{n: self.counters[n] + counts.get(n, 0) for n in COUNTERS},
        }

    # ---- samplers ------------------------------------------------------------
    def sample(self, batch_size: int) -> ShardSample:
        """batch_size transitions drawn with probability p_i**alpha / total
        (empty arrays when nothing is stored)."""
        with self.lock:
            total, size = self.tree.total, self.size
            if size == 0 or total <= 0 or batch_size <= 0:
                pos = np.zeros(0, np.int64)
                probs = np.zeros(0, np.float64)
            else:
                pos = self.tree.sample(batch_size, self._rng)
                probs = self.tree.get(pos) / total
            rec = self.rec[pos]
            slots = self.first + (pos - self.first) % self.capacity
            self.sampled_total += int(pos.size)
            inserted = self.counters["inserted_total"]
        ids = rec["ids"]
        return ShardSample(
            keys=slots.astype(np.int64),
            probs=probs,
            obs_ids=np.ascontiguousarray(ids[:, :STACK]),
            next_obs_ids=np.ascontiguousarray(ids[:, STACK:]),
            actions=rec["action"].astype(np.int64),
            returns=rec["ret"].astype(np.float32),
            discounts=rec["disc"].astype(np.float32),
            size=int(size),
            total=float(total),
            inserted_total=int(inserted),
        )

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Set priorities of sampled keys (int64[k] slots, the shard's bits above
        SLOT_BITS ignored), clipped to [MIN_PRIORITY, MAX_PRIORITY]; evicted slots,
        slots of weight 0 (removed, skipped, or refused at load: they stay out) and
        non-finite priorities are ignored. Returns how many were applied."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        p = np.asarray(priorities, np.float64)
        if slots.shape != p.shape:
            raise ValueError(f"keys {slots.shape} and priorities {p.shape} differ in shape")
        with self.lock:
            ok = (slots >= self.first) & (slots < self.next) & np.isfinite(p)
            ok[ok] = self.tree.get(slots[ok] % self.capacity) > 0
            pos = slots[ok] % self.capacity
            pr = np.clip(p[ok], MIN_PRIORITY, MAX_PRIORITY)
            self.prio[pos] = pr
            self.tree.update(pos, pr**self.alpha)
            return int(ok.sum())

    def remove(self, keys: np.ndarray) -> int:
        """Never sample these slots again (weight 0; counted ``removed``).
        Returns how many live slots were removed."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        with self.lock:
            ok = (slots >= self.first) & (slots < self.next)
            pos = np.unique(slots[ok] % self.capacity)
            self.tree.update(pos, np.zeros(pos.size))
            self.removed += int(pos.size)
            return int(pos.size)

    def get_priorities(self, keys: np.ndarray) -> np.ndarray:
        """float32[k] current priorities of keys (NaN for slots no longer stored)."""
        slots = np.asarray(keys, np.int64) & ((1 << SLOT_BITS) - 1)
        with self.lock:
            ok = (slots >= self.first) & (slots < self.next)
            out = np.full(slots.shape, np.nan, np.float32)
            out[ok] = self.prio[slots[ok] % self.capacity]
        return out

    # ---- storage helpers -----------------------------------------------------
    def priorities_blob(self) -> bytes:
        """The priorities of all live slots: ``<i8 first, <i8 next`` then ``<f4`` each."""
        with self.lock:
            first, nxt = self.first, self.next
            pos = np.arange(first, nxt, dtype=np.int64) % self.capacity
            body = self.prio[pos].astype("<f4").tobytes()
        return np.array([first, nxt], "<i8").tobytes() + body

    def covered(self, frame_ids: np.ndarray) -> np.ndarray:
        """bool[m]: which frame ids live slots still refer to."""
        with self.lock:
            return self.groups.covered(frame_ids)

    def evict_all(self) -> int:
        """Drop every live slot (slots stay monotonic: old keys stay invalid).
        Returns how many were dropped (also ``resets`` / ``lost_in_resets``)."""
        with self.lock:
            lost = self.size
            self.first = self.next
            self.tree.set_all(np.zeros(self.capacity))
            self.groups = FrameGroups()
            self.counters["resets"] += 1
            self.counters["lost_in_resets"] += lost
        return lost

    def load(
        self,
        rec: np.ndarray,
        first: int,
        nxt: int,
        meta: dict[str, int],
        priorities_blob: bytes | None,
        group_raw: dict[bytes, bytes],
    ) -> LoadReport:
        """Become the index of stored data: ``rec`` (RECORD_DTYPE[capacity], all
        chunks read), the live slots ``[first, nxt)``, the counters in ``meta``, a
        `priorities_blob` (newer than the records' initial priorities where it
        covers a slot) and the groups hash.

        Defensive: records that fail validation get weight 0 (never sampled), as
        do records whose frames no group holds; group entries that do not parse or
        overlap are dropped. The caller checks sizes before reading (``first <= nxt
        <= first + capacity``, a bounded number of groups)."""
        report = LoadReport()
        live = np.arange(first, nxt, dtype=np.int64)
        pos = live % self.capacity
        prio = rec["prio"][pos].astype(np.float64)
        snap = priorities_blob
        if snap is not None and len(snap) >= 16 and (len(snap) - 16) % 4 == 0:
            s0, s1 = (int(x) for x in np.frombuffer(snap[:16], "<i8"))
            sp = np.frombuffer(snap[16:], "<f4")
            if sp.size == s1 - s0 and 0 <= s0 <= s1:
                m = (live >= s0) & (live < s1)
                prio[m] = sp[live[m] - s0]
        groups = FrameGroups()
        for gid_raw, data in group_raw.items():
            try:
                gid = int(gid_raw)
                ids, created = FrameGroups.unpack(data)
                if not 0 <= gid < 1 << 62 or (groups.lookup(ids) >= 0).any():
                    raise ValueError("bad or overlapping group")
                groups.add(ids, created, gid=gid)
            except ValueError:
                report.bad_groups += 1
        recs = rec[pos]
        valid = stored_ok(recs, self.num_actions) & np.isfinite(prio) & (prio >= 0)
        prio = np.where(valid, np.clip(prio, MIN_PRIORITY, MAX_PRIORITY), MIN_PRIORITY)
        rows = groups.lookup(recs["ids"].ravel()).reshape(recs["ids"].shape)
        known = (rows >= 0).all(axis=1)
        weight = np.zeros(self.capacity, np.float64)
        weight[pos] = np.where(valid & known, prio**self.alpha, 0.0)
        ok = rows >= 0
        groups.touch(rows[ok], np.repeat(live, 2 * STACK).reshape(rows.shape)[ok])
        groups.next_gid = max(groups.next_gid, meta.get("next_gid", 0))
        # empty records (frame ids 0: no real frame has id 0) are skipped slots
        empty = (recs["ids"] == 0).all(axis=1)
        report.bad_records = int((~valid).sum())
        report.dangling = int((valid & ~known & ~empty).sum())
        skipped = _runs(live[empty])
        with self.lock:
            self.rec = rec
            self.prio[:] = 0
            self.prio[pos] = prio
            self.tree.set_all(weight)
            self.groups = groups
            self.first, self.next = first, nxt
            self._skipped = skipped
            for name in COUNTERS:
                self.counters[name] = meta.get(name, 0)
            self.counters["rejected"] += report.bad_records
            self.counters["dangling"] += report.dangling
        return report


def _runs(slots: np.ndarray) -> list[tuple[int, int]]:
    """Sorted int64 slots as ranges ``[a, b)`` of consecutive slots."""
    if slots.size == 0:
        return []
    brk = np.flatnonzero(np.diff(slots) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(slots, brk)]
