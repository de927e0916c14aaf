"""The replay's stored record: its layout in Redis and the checks it must pass.

A transition is stored as one 80-byte record (:data:`RECORD_DTYPE`): the 8 frame
ids of ``s`` and ``s'``, the action, the n-step return and discount, and the
initial priority. Records live in chunk strings of :data:`RECORDS_PER_CHUNK`
(one Redis key per chunk, ``replay_server.keys.ReplayKeys.records``), preallocated
at full size so SETRANGE never grows them; ring position ``p`` is record
``p % RECORDS_PER_CHUNK`` of chunk ``p // RECORDS_PER_CHUNK``.

Nothing read from Redis or a push is trusted: `records_ok` (a pushed batch) and
`stored_ok` (records read back) apply the same bounds, and `writer_frames_ok`
checks that a push's new frames are one contiguous run of one registered writer.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from common.types import COUNTER_BITS, PRIORITY_FLOOR, STACK

RECORD_DTYPE = np.dtype(
    [
        ("ids", "<i8", (2 * STACK,)),
        ("action", "<i4"),
        ("ret", "<f4"),
        ("disc", "<f4"),
        ("prio", "<f4"),
    ]
)  # ids = s (4 frame ids, oldest first) then s' (4); prio = initial priority
RECORDS_PER_CHUNK = 4096
MIN_PRIORITY = PRIORITY_FLOOR  # the same floor as the actors' initial priorities
MAX_PRIORITY = 1e6  # |TD| of clipped-reward DQN stays below ~200; 1e6 is generous
MAX_RETURN = 1e9  # n-step returns of raw scores stay far below this
MAX_ACTIONS = 1 << 16
SLOT_BITS = 56  # keys are slots < 2**56; the sampler puts the shard index above


def chunk_len(capacity: int, chunk: int) -> int:
    """Records in chunk ``chunk`` of a ring of ``capacity`` (the last may be short)."""
    return min(RECORDS_PER_CHUNK, capacity - chunk * RECORDS_PER_CHUNK)


def chunk_runs(pos: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split ring positions into runs that are consecutive inside one chunk:
    ``(chunk, byte offset in the chunk, indices into pos)`` per run (one SETRANGE each)."""
    if pos.size == 0:
        return
    chunk = pos // RECORDS_PER_CHUNK
    brk = np.flatnonzero((np.diff(chunk) != 0) | (np.diff(pos) != 1)) + 1
    for run in np.split(np.arange(pos.size), brk):
        c = int(chunk[run[0]])
        yield c, (int(pos[run[0]]) - c * RECORDS_PER_CHUNK) * RECORD_DTYPE.itemsize, run


def writer_frames_ok(fids: np.ndarray, incarnation: int) -> bool:
    """A push's new frames: one contiguous run of ids of one registered writer
    (incarnation in ``[1, incarnation]``, the namespace's newest)."""
    if fids.size == 0:
        return True
    inc = fids >> COUNTER_BITS
    if inc[0] < 1 or inc[0] > incarnation or (inc != inc[0]).any():
        return False
    return bool(np.all(np.diff(fids) == 1))


def _valid(actions, returns, discounts, priorities, num_actions: int) -> np.ndarray:
    """bool[n]: which transitions have sane fields (pushed or read back from Redis)."""
    with np.errstate(invalid="ignore"):
        return (
            (actions >= 0)
            & (actions < num_actions)
            & np.isfinite(returns)
            & (np.abs(returns) <= MAX_RETURN)
            & (discounts >= 0)
            & (discounts <= 1)
            & np.isfinite(priorities)
            & (priorities >= 0)
            & (priorities <= MAX_PRIORITY)
        )


def records_ok(batch, num_actions: int) -> np.ndarray:
    """bool[n]: which pushed transitions (a `common.types.TransitionBatch`) have sane fields."""
    return _valid(batch.actions, batch.returns, batch.discounts, batch.priorities, num_actions)


def stored_ok(recs: np.ndarray, num_actions: int) -> np.ndarray:
    """bool[n]: which records read back from Redis have sane fields."""
    return _valid(recs["action"], recs["ret"], recs["disc"], recs["prio"], num_actions)
