"""Which stored frames are still needed: frame lifetime by push group.

Frames are stored once (by the writer) and referred to by id from up to eight
transition stacks (``s`` and ``s'``), which may come from the same push or the
next one. Reference-counting millions of frames in a Python dict would cost
~100 B per frame; instead the shard tracks *groups*: the frames stored by one
push, which an actor numbers consecutively, so a group is an id range
``[lo, hi]``. Each group remembers ``last_ref``, the newest replay slot that
refers to any of its frames. When eviction moves the oldest live slot past
``last_ref`` no live transition can refer to the group and its frames are
deleted. A few thousand groups cover a 2M-transition replay; lookups are one
``np.searchsorted``.

Assumption (documented for actors): the ids stored by one push form a range
that no other push's range overlaps (true for ``make_frame_id`` with a counter).
Overlapping ranges are merged into one group, which is safe but frees later.
Not thread-safe: the shard holds its lock.
"""

from __future__ import annotations

import numpy as np

MAX_GROUP_FRAMES = 1 << 20  # frames one push may store (an actor pushes a few thousand)


class FrameGroups:
    """Sorted, disjoint frame-id ranges with their last referencing slot."""

    def __init__(self) -> None:
        self.lo = np.zeros(0, np.int64)
        self.hi = np.zeros(0, np.int64)
        self.last_ref = np.zeros(0, np.int64)
        self.gid = np.zeros(0, np.int64)
        self.frames: dict[int, np.ndarray] = {}  # gid -> int64 frame ids
        self.next_gid = 0
        self.frame_count = 0

    def __len__(self) -> int:
        return int(self.lo.size)

    def copy(self) -> FrameGroups:
        """An independent copy (arrays copied, the per-group id arrays shared: they are
        never modified in place). The shard plans an ingest on a copy and keeps it
        only once Redis has accepted the write."""
        other = FrameGroups()
        other.lo, other.hi = self.lo.copy(), self.hi.copy()
        other.last_ref, other.gid = self.last_ref.copy(), self.gid.copy()
        other.frames = dict(self.frames)
        other.next_gid, other.frame_count = self.next_gid, self.frame_count
        return other

    def covered(self, ids: np.ndarray) -> np.ndarray:
        """bool[m]: which ids some group holds (exactly, not just inside its range)."""
        ids = np.asarray(ids, np.int64)
        row = self.lookup(ids)
        out = np.zeros(ids.shape, bool)
        for r in np.unique(row[row >= 0]):
            m = row == r
            out[m] = np.isin(ids[m], self.frames[int(self.gid[r])])
        return out

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Group row (index into lo/hi/...) of each id, -1 when no group covers it."""
        ids = np.asarray(ids, np.int64)
        row = np.searchsorted(self.lo, ids, side="right") - 1
        ok = row >= 0
        ok[ok] = ids[ok] <= self.hi[row[ok]]
        return np.where(ok, row, -1)

    def add(
        self, ids: np.ndarray, last_ref: int, gid: int | None = None
    ) -> tuple[int, np.ndarray, list[int]] | None:
        """Record newly stored frames int64[m] as one group; ids already covered
        (a retried push) are ignored. Returns None when nothing was new, else
        (gid, all ids of the group, gids of groups merged into it and gone)."""
        ids = np.asarray(ids, np.int64)
        if ids.size:
            ids = np.unique(ids[self.lookup(ids) < 0])
        if ids.size == 0:
            return None
        lo, hi = int(ids[0]), int(ids[-1])
        # Any existing group inside [lo, hi]? Merge them all into this one.
        a = int(np.searchsorted(self.lo, lo, side="left"))
        b = int(np.searchsorted(self.lo, hi, side="right"))
        if a > 0 and self.hi[a - 1] >= lo:
            a -= 1
        gone: list[int] = []
        if b > a:
            gone = [int(g) for g in self.gid[a:b]]
            merged = [ids] + [self.frames.pop(int(g)) for g in self.gid[a:b]]
            ids = np.unique(np.concatenate(merged))
            self.frame_count -= sum(m.size for m in merged[1:])
            last_ref = max(last_ref, int(self.last_ref[a:b].max()))
            lo, hi = min(lo, int(self.lo[a])), max(hi, int(self.hi[b - 1]))
            self._delete_rows(np.arange(a, b))
        if gid is None:
            gid = self.next_gid
        self.next_gid = max(self.next_gid, gid + 1)
        pos = int(np.searchsorted(self.lo, lo))
        self.lo = np.insert(self.lo, pos, lo)
        self.hi = np.insert(self.hi, pos, hi)
        self.last_ref = np.insert(self.last_ref, pos, last_ref)
        self.gid = np.insert(self.gid, pos, gid)
        self.frames[gid] = ids
        self.frame_count += ids.size
        return gid, ids, gone

    def touch(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """last_ref[rows] = max(last_ref[rows], slots) (rows may repeat)."""
        if rows.size:
            np.maximum.at(self.last_ref, rows, slots)

    def release(self, first_live_slot: int) -> tuple[list[int], np.ndarray]:
        """Drop groups no live slot refers to; return (their gids, their frame ids)."""
        dead = np.flatnonzero(self.last_ref < first_live_slot)
        if dead.size == 0:
            return [], np.zeros(0, np.int64)
        gids = [int(g) for g in self.gid[dead]]
        ids = [self.frames.pop(g) for g in gids]
        self._delete_rows(dead)
        freed = np.concatenate(ids)
        self.frame_count -= freed.size
        return gids, freed

    def _delete_rows(self, rows: np.ndarray) -> None:
        keep = np.ones(self.lo.size, bool)
        keep[rows] = False
        self.lo, self.hi = self.lo[keep], self.hi[keep]
        self.last_ref, self.gid = self.last_ref[keep], self.gid[keep]

    # ---- persistence ------------------------------------------------------
    @staticmethod
    def pack(ids: np.ndarray, created_slot: int) -> bytes:
        """Group record: int64 created_slot, then (start, length) runs of ids."""
        ids = np.asarray(ids, np.int64)
        brk = np.flatnonzero(np.diff(ids) != 1) + 1
        starts = ids[np.r_[0, brk]]
        lengths = np.diff(np.r_[0, brk, ids.size])
        runs = np.stack([starts, lengths], axis=1).astype("<i8")
        return np.int64(created_slot).astype("<i8").tobytes() + runs.tobytes()

    @staticmethod
    def unpack(data: bytes, max_ids: int = MAX_GROUP_FRAMES) -> tuple[np.ndarray, int]:
        """Inverse of :meth:`pack`: (int64 ids, created_slot).

        Raises ValueError for a record that is not a valid group (odd length, runs
        that are empty, overlap or go backwards, or more than ``max_ids`` ids: a
        record read back from Redis is checked before anything is allocated).
        """
        if len(data) % 8:
            raise ValueError(f"bad frame-group record of {len(data)} bytes")
        arr = np.frombuffer(data, "<i8")
        if arr.size < 3 or (arr.size - 1) % 2:
            raise ValueError(f"bad frame-group record of {len(data)} bytes")
        runs = arr[1:].reshape(-1, 2)
        starts, lengths = runs[:, 0], runs[:, 1]
        if (lengths < 1).any() or int(lengths.sum()) > max_ids:
            raise ValueError(f"frame-group record claims {int(lengths.sum())} frame ids")
        if (starts[1:] < starts[:-1] + lengths[:-1]).any() or (starts < 0).any():
            raise ValueError("frame-group record has overlapping or negative runs")
        ids = np.concatenate([np.arange(s, s + n, dtype=np.int64) for s, n in runs])
        return ids, int(arr[0])
