"""Adapter: a Ray actor handle of :class:`ReplayShard` as a synchronous shard.

The sampler wants ``sample``/``update_priorities``/``stats`` that return values;
wrap each shard actor in a :class:`RemoteShard` before handing it over::

    Shard = ray.remote(ReplayShard).options(max_concurrency=4)
    handle = Shard.remote(url, capacity_per_shard, alpha, codec)
    handle.start.remote()
    sampler = ReplaySampler([RemoteShard(handle)], [url], codec, ...)

``update_priorities`` waits for the shard's answer: the learner calls it from its
background `learner.loop.PriorityWriter` thread, one call at a time, so a shard
applies priority updates in the order they were produced, and the writer's
bounded queue is the back-pressure. (Fire-and-forget calls into a threaded
actor could be applied out of order and could queue without bound.)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from replay_server.protocol import ShardSample, ShardStats


class RemoteShard:
    """Synchronous view of a ``ray.remote(ReplayShard)`` actor handle."""

    def __init__(self, handle: Any, timeout: float = 60.0) -> None:
        self.handle = handle
        self.timeout = timeout

    def sample(self, batch_size: int) -> ShardSample:
        import ray

        return ray.get(self.handle.sample.remote(batch_size), timeout=self.timeout)

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """Apply new priorities; returns how many the shard applied. Raises Ray's
        errors (the shard is restarting: the caller drops this update)."""
        import ray

        return ray.get(self.handle.update_priorities.remote(keys, priorities), timeout=self.timeout)

    def remove(self, keys: np.ndarray) -> int:
        """Make slots unsampleable (their frames are gone); see `ReplayShard.remove`."""
        import ray

        return ray.get(self.handle.remove.remote(keys), timeout=self.timeout)

    def stats(self) -> ShardStats:
        import ray

        return ray.get(self.handle.stats.remote(), timeout=self.timeout)
