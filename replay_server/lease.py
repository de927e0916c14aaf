"""One owner per replay: a lease in the replay's Redis (``P owner``).

A run takes the lease of every shard's namespace before it starts anything
(`acquire`, in the launcher), its shards refresh it with their heartbeat every
second (`refresh`: only while it is still theirs) and give it back when they
stop (`release`). The lease lives ``LEASE_MS`` without a refresh, so a run that
died (kill -9, a lost machine) frees its replay within that time.

A second run against a leased replay is refused before it writes anything,
with the holder's host, driver pid and logdir and how long the lease has left;
``--replay-reset`` never deletes a leased replay. The shard's ingest only
commits while the lease is its own (`replay_server.shard.ReplayShard.ingest`
WATCHes the key), so a run that lost its lease (its Redis unreachable for
longer than the lease, and another run took over) cannot write into the other
run's data.

One exception, safe because of the logdir lock (`common.locks`): a lease held
by a run with the same logdir is taken over. Only one process can hold a
logdir, so that run is gone (``--resume`` right after a kill -9 of the driver).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import redis

from replay_server.keys import ReplayKeys

LEASE_MS = 15_000  # how long a lease outlives its last refresh (heartbeat: 1 s)

# KEYS: owner. ARGV: our value, ttl ms. Take or refresh the lease if free or ours.
_TAKE = """
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
# KEYS: owner. ARGV: our value. Delete the lease only if it is ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseHeld(RuntimeError):
    """Another run holds the replay; the message names it and its time left."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a random run token, the host, the driver's pid, the logdir."""

    run: str
    host: str
    pid: int
    logdir: str

    @staticmethod
    def this_run(logdir: str) -> Owner:
        return Owner(os.urandom(8).hex(), socket.gethostname(), os.getpid(), str(logdir))

    def encode(self) -> str:
        return f"run={self.run} host={self.host} pid={self.pid} logdir={self.logdir}"

    @staticmethod
    def decode(value: bytes | str) -> Owner | None:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        fields = dict(part.split("=", 1) for part in text.split(" ", 3) if "=" in part)
        try:
            return Owner(fields["run"], fields["host"], int(fields["pid"]), fields["logdir"])
        except (KeyError, ValueError):
            return None

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, logdir {self.logdir}"


def acquire(
    client: redis.Redis, keys: ReplayKeys, owner: Owner, where: str, ttl_ms: int = LEASE_MS
) -> None:
    """Take the lease for ``owner``, or raise `LeaseHeld` naming its holder. A
    holder with ``owner``'s logdir is taken over (see the module)."""
    value = owner.encode()
    if client.eval(_TAKE, 1, keys.owner, value, ttl_ms):
        return
    held, left_ms = client.get(keys.owner), client.pttl(keys.owner)
    holder = Owner.decode(held) if held is not None else None
    if held is None:  # expired between the two calls
        if client.eval(_TAKE, 1, keys.owner, value, ttl_ms):
            return
        held, left_ms = client.get(keys.owner), client.pttl(keys.owner)
        holder = Owner.decode(held) if held is not None else None
    if holder is not None and holder.logdir == owner.logdir:
        # the same logdir: its lock is ours now, so that run is gone
        client.set(keys.owner, value, px=ttl_ms)
        return
    who = holder.describe() if holder is not None else repr(held)
    left = f"{max(left_ms, 0) / 1000:.0f} s" if left_ms and left_ms > 0 else "no expiry"
    raise LeaseHeld(
        f"the replay in {where} is in use by another run ({who}); its lease ends in "
        f"{left} unless that run is alive. Stop that run, or give this one another "
        "Redis (--redis-url) or logdir; --replay-reset does not delete a replay in use"
    )


def refresh(client: redis.Redis, keys: ReplayKeys, value: str, ttl_ms: int = LEASE_MS) -> bool:
    """Extend the lease if it is still ``value``'s (or free: take it again);
    False when another run holds it."""
    return bool(client.eval(_TAKE, 1, keys.owner, value, ttl_ms))


def release(client: redis.Redis, keys: ReplayKeys, value: str) -> bool:
    """Give the lease back if it is ``value``'s."""
    return bool(client.eval(_RELEASE, 1, keys.owner, value))
