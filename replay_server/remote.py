"""Adapter: a Ray actor handle of :class:`ReplayShard` as a synchronous shard.

The sampler wants ``sample``/``update_priorities``/``stats`` that return values;
wrap each shard actor in a :class:`RemoteShard` before handing it over::

    Shard = ray.remote(ReplayShard).options(max_concurrency=4)
    handle = Shard.remote(url, capacity_per_shard, alpha, codec)
    handle.start.remote()
    sampler = ReplaySampler([RemoteShard(handle)], [url], codec, ...)

``update_priorities`` is fire-and-forget (the learner does not wait for it).
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

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> None:
        self.handle.update_priorities.remote(keys, priorities)

    def stats(self) -> ShardStats:
        import ray

        return ray.get(self.handle.stats.remote(), timeout=self.timeout)
