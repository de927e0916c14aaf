"""Adapter: a Ray actor handle of :class:`ReplayShard` as a synchronous shard.

The sampler wants ``sample``/``update_priorities``/``stats`` that return values;
wrap each shard actor in a :class:`RemoteShard` before handing it over::

    Shard = ray.remote(ReplayShard).options(max_concurrency=8, max_restarts=-1)
    handle = Shard.remote(url, capacity_per_shard, alpha=alpha, codec=codec, autostart=True)
    sampler = ReplaySampler(pair([RemoteShard(handle)], endpoints([url])), codec, ...)

A shard actor that is dead, restarting or not answering within ``timeout`` is an
outage like a Redis that is down: every method raises `ReplayUnavailable` (the
caller backs off and retries, or drops a priority update; a restarted actor
answers again through the same handle).

``update_priorities`` waits for the shard's answer: the learner calls it from its
background `learner.background.PriorityWriter` thread, one call at a time, so a shard
applies priority updates in the order they were produced, and the writer's
bounded queue is the back-pressure. (Fire-and-forget calls into a threaded
actor could be applied out of order and could queue without bound.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from replay_server.protocol import ReplayUnavailable, ShardSample, ShardStats


@contextmanager
def _actor_errors(what: str) -> Iterator[None]:
    """Ray's "the actor is not there right now" errors -> `ReplayUnavailable`."""
    import ray

    try:
        yield
    except (
        ray.exceptions.RayActorError,  # dead or restarting (ActorDiedError, ActorUnavailableError)
        ray.exceptions.GetTimeoutError,
    ) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReplayUnavailable(f"{what} is unavailable: {type(exc).__name__}: {text}") from None


class RemoteShard:
    """Synchronous view of a ``ray.remote(ReplayShard)`` actor handle."""

    def __init__(self, handle: Any, timeout: float = 60.0, name: str = "replay shard") -> None:
        self.handle = handle
        self.timeout = timeout
        self.name = name

    def sample(self, batch_size: int) -> ShardSample:
        import ray

        with _actor_errors(self.name):
            return ray.get(self.handle.sample.remote(batch_size), timeout=self.timeout)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Apply new priorities; returns how many the shard applied. Raises
        `ReplayUnavailable` (the shard is restarting: the caller drops this update)."""
        import ray

        with _actor_errors(self.name):
            ref = self.handle.update_priorities.remote(keys, priorities)
            return ray.get(ref, timeout=self.timeout)

    def remove(self, keys: np.ndarray) -> int:
        """Make slots unsampleable (their frames are gone); see `ReplayShard.remove`."""
        import ray

        with _actor_errors(self.name):
            return ray.get(self.handle.remove.remote(keys), timeout=self.timeout)

    def stats(self) -> ShardStats:
        import ray

        with _actor_errors(self.name):
            return ray.get(self.handle.stats.remote(), timeout=self.timeout)
