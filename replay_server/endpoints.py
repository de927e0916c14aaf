"""Each replay shard and its Redis, paired once per run.

A run has one shard per Redis (``--redis-url a,b,...``, or the embedded
servers). `ShardEndpoint` names one Redis (the shard's index, its URL, the key
namespace) and opens connections to it (`ShardEndpoint.connect`: PING-checked,
the password never in an error). `ShardLink` pairs a shard (anything that
satisfies `replay_server.protocol.Shard`) with its endpoint.

The launcher builds the endpoints once (`endpoints`); the replay fleet pairs its
shards with them (`pair`); the sampler, the insert budget, the actors and the
namespace checks take them from there, so no two lists are matched by
position anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import redis

from replay_server.protocol import Shard
from replay_server.redis_proc import connect, redact


@dataclass(frozen=True)
class ShardEndpoint:
    """Shard ``index``'s Redis: ``url`` (never printed: `where` is the redacted
    form) and the key ``namespace``."""

    index: int
    url: str = field(repr=False)
    namespace: str = "apex"

    @property
    def where(self) -> str:
        """``Redis at <url without its password>``, for messages."""
        return f"Redis at {redact(self.url)}"

    def connect(self, timeout: float = 5.0) -> redis.Redis:
        """A connected client (`replay_server.redis_proc.connect`); raises
        `ReplayUnavailable` when the Redis cannot be reached."""
        return connect(self.url, timeout)


@dataclass(frozen=True)
class ShardLink:
    """One shard and the Redis it owns."""

    shard: Shard
    endpoint: ShardEndpoint


def endpoints(urls: Sequence[str], namespace: str = "apex") -> list[ShardEndpoint]:
    """One endpoint per URL, shard ``k`` at ``urls[k]``."""
    if not urls:
        raise ValueError("a replay needs at least one Redis URL")
    return [ShardEndpoint(k, url, namespace) for k, url in enumerate(urls)]


def pair(shards: Sequence[Shard], eps: Sequence[ShardEndpoint]) -> list[ShardLink]:
    """``shards[k]`` with ``eps[k]``: the one place shards meet their Redis."""
    if len(shards) != len(eps) or not shards:
        raise ValueError(
            f"need one Redis per shard, got {len(shards)} shards and {len(eps)} endpoints"
        )
    return [ShardLink(s, e) for s, e in zip(shards, eps, strict=True)]
