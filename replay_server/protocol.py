"""The replay's client contract: typed results and the one place Redis errors become outages.

Who calls what (each line is a seam; see the classes named):

* writers (actors): `replay_server.writer.ReplayWriter.push` -> Redis directly;
* the learner's sampler: ``shard.sample(batch_size) -> ShardSample``,
  ``shard.update_priorities(keys, priorities)`` and ``shard.remove(keys)`` (rows
  whose frames turned out missing or corrupt leave the sum tree) on each
  `ReplayShard` (a Ray actor in production through `replay_server.remote.RemoteShard`,
  in-process in tests), then frames from Redis directly;
* the driver: ``shard.stats() -> ShardStats``.

`Shard` is that contract as a Protocol; `replay_server.endpoints` pairs each
shard with its Redis (`ShardLink`), once per run.

Every Redis call on these paths goes through :func:`replay_errors`, which turns the
errors that mean "the replay cannot be used right now" into
:class:`ReplayUnavailable`: the server is unreachable, restarting or loading, or it
refuses writes (``OOM`` at maxmemory, ``MISCONF`` when it cannot persist,
``READONLY`` on a replica). Callers treat all of them alike: keep the data, back
off, retry. Any other Redis error is a bug or bad data and propagates.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import redis


class Shard(Protocol):
    """What the sampler and the driver call on a replay shard: a
    `replay_server.shard.ReplayShard` in this process (tests, ``--in-process``) or
    a `replay_server.remote.RemoteShard` over its Ray actor. Every method raises
    `ReplayUnavailable` while the shard (or its Redis) cannot answer."""

    def sample(self, batch_size: int) -> ShardSample:
        """Up to ``batch_size`` rows drawn by priority (empty when nothing is stored)."""
        ...

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> Any:
        """New priorities of sampled slots (evicted ones are ignored)."""
        ...

    def remove(self, keys: np.ndarray) -> Any:
        """Never sample these slots again (their frames are gone)."""
        ...

    def stats(self) -> ShardStats:
        """Counters and health (`ShardStats`)."""
        ...


class ReplayUnavailable(ConnectionError):
    """The replay's Redis cannot be used right now (down, loading, or refusing writes).

    The message says where (the URL without its password) and what happened.
    """


# Write refusals: redis-py maps OOM, READONLY, LOADING and MASTERDOWN to classes;
# MISCONF (cannot persist: disk full), NOREPLICAS and BUSY (a script or module
# command runs past busy-reply-threshold; Redis answers nothing else until it ends
# or SCRIPT KILL) arrive as plain ResponseErrors. All of them pass by themselves:
# outages, never errors to retry at full speed.
_REFUSED = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
    redis.exceptions.MasterDownError,
)
_REFUSAL_PREFIXES = ("MISCONF", "NOREPLICAS", "OOM", "READONLY", "LOADING", "MASTERDOWN", "BUSY")
# The code at the start of the message, after the "-" of one wrapped by a script
# error, or after redis-py's "Command # 1 (...) of pipeline caused error: "; a whole
# word (BUSYKEY, a RESTORE conflict, is not an outage).
_REFUSAL_RE = re.compile(rf"(?:^|-|caused error: )(?:{'|'.join(_REFUSAL_PREFIXES)})\b")


def is_outage(exc: BaseException) -> bool:
    """True for errors that mean the replay is unavailable rather than wrong."""
    if isinstance(exc, ReplayUnavailable | redis.ConnectionError | redis.TimeoutError | OSError):
        return True
    if isinstance(exc, _REFUSED):
        return True
    if not isinstance(exc, redis.ResponseError):
        return False
    # A refusal inside a Lua script arrives wrapped: "Error running script ...: -OOM ..."
    return _REFUSAL_RE.search(str(exc)) is not None


@contextmanager
def replay_errors(where: str) -> Iterator[None]:
    """Turn outage errors raised inside the block into `ReplayUnavailable`.

    where: what to name in the message, e.g. ``"Redis at redis://:***@host:6379/0"``
    (never a URL with its password: use `replay_server.redis_proc.redact`).
    Inside a MULTI/EXEC a refused command surfaces as an ExecAbortError or as the
    command's own error in the reply; both are mapped the same way.
    """
    try:
        yield
    except ReplayUnavailable:
        raise
    except redis.exceptions.ExecAbortError as exc:  # a command refused while queued in MULTI
        if _REFUSAL_RE.search(str(exc)) is not None:
            raise ReplayUnavailable(f"{where} refused the write: {_describe(exc)}") from None
        raise
    except (redis.RedisError, OSError) as exc:
        if is_outage(exc):
            raise ReplayUnavailable(f"{where} is unavailable: {_describe(exc)}") from None
        raise


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


@dataclass
class ShardSample:
    """One shard's part of a prioritized batch (what `ReplayShard.sample` returns).

    keys:          int64[b]     slots (the sampler puts the shard index above SLOT_BITS)
    probs:         float64[b]   p_i**alpha / total of this shard
    obs_ids:       int64[b, 4]  frame ids of s (oldest first)
    next_obs_ids:  int64[b, 4]  frame ids of s'
    actions:       int64[b]
    returns:       float32[b]
    discounts:     float32[b]
    size:          transitions stored in the shard when it was drawn
    total:         the shard's total priority weight (sum of p**alpha)
    inserted_total: transitions the shard has stored since it was created (the
                   name `ShardStats` uses too)
    """

    keys: np.ndarray
    probs: np.ndarray
    obs_ids: np.ndarray
    next_obs_ids: np.ndarray
    actions: np.ndarray
    returns: np.ndarray
    discounts: np.ndarray
    size: int
    total: float
    inserted_total: int

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass
class ShardStats:
    """Counters of one shard (`ReplayShard.stats`); plain Python numbers.

    size / capacity:      transitions stored / the ring's capacity
    inserted_total:       transitions stored since the namespace was created
    inserts_per_s:        recent ingest rate
    sampled_total:        transitions drawn by samplers (this process)
    total_priority:       sum of p**alpha over stored transitions
    bytes_used:           the Redis server's used_memory (cached 1 s; 0 if unknown)
    evictions:            transitions evicted by the FIFO ring
    received:             transitions in pushes that decoded (stored or not)
    malformed:            pushes that did not decode (skipped)
    rejected:             records refused by validation (never stored)
    dangling:             transitions dropped (or made unsampleable) because their
                          frames were missing at ingest
    removed:              stored transitions made unsampleable because a sampler
                          found their frames missing (`ReplayShard.remove`)
    ingest_errors:        background rounds that failed (Redis unavailable, or a bug)
    frames_stored:        frames the index refers to
    frame_groups:         frame groups (one per push) alive
    lost:                 stored transitions Redis lost (its newest writes, after a
                          crash within the AOF fsync window)
    resets:               times Redis came back without the replay's data
    lost_in_resets:       transitions the index held at those resets
    orphans_collected:    frames deleted by the orphan sweep
    outages:              times the shard found its Redis unavailable
    outage_s:             seconds it was unavailable in all (the current outage included)
    down_s:               seconds of the current outage (0 while available)
    available:            Redis usable and the index loaded right now
    pid / started_at:     the shard's process and its start time (a restart changes them)
    """

    size: int = 0
    capacity: int = 0
    inserted_total: int = 0
    inserts_per_s: float = 0.0
    sampled_total: int = 0
    total_priority: float = 0.0
    bytes_used: int = 0
    evictions: int = 0
    received: int = 0
    malformed: int = 0
    rejected: int = 0
    dangling: int = 0
    removed: int = 0
    ingest_errors: int = 0
    frames_stored: int = 0
    frame_groups: int = 0
    lost: int = 0
    resets: int = 0
    lost_in_resets: int = 0
    orphans_collected: int = 0
    outages: int = 0
    outage_s: float = 0.0
    down_s: float = 0.0
    available: bool = False
    pid: int = 0
    started_at: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
