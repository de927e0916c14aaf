"""What a replay namespace holds, checked before a run uses it; and resetting it.

A namespace (``<name>:v<KEY_VERSION>:*`` in one Redis, see `replay_server.keys`)
stores its `ReplayIdentity`: the game, action count, frame shape and codec, n-step
and gamma its transitions were made with. A run whose settings differ would mix
incompatible data (another game's actions, other discounts), so the launcher calls
:func:`inspect_namespace` on every shard's Redis before anything starts and refuses
the run (exit 2, naming ``--replay-reset``) when it finds a problem: another
identity, another capacity, keys it does not know under the prefix, keys of the
wrong type, values that do not parse. :func:`reset_namespace` deletes every key of
the namespace (and nothing else) for ``--replay-reset``.

The checks read only the namespace's small keys (SCAN with a pattern that skips
frame keys) and the chunk sizes, so they take well under a second even for a
2M-transition replay.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import redis

from replay_server.keys import KEY_VERSION, ReplayKeys
from replay_server.protocol import replay_errors

MAX_PROBLEMS = 8
# Integer fields of ``P meta`` and the largest value each may hold.
META_LIMITS: dict[str, int] = {
    "capacity": 1 << 40,
    "first_slot": 1 << 56,
    "next_slot": 1 << 56,
    "inserted_total": 1 << 62,
    "received": 1 << 62,
    "evictions": 1 << 62,
    "malformed": 1 << 62,
    "rejected": 1 << 62,
    "dangling": 1 << 62,
    "lost": 1 << 62,
    "resets": 1 << 40,
    "lost_in_resets": 1 << 62,
    "orphans_collected": 1 << 62,
    "outages": 1 << 40,
    "outage_ms": 1 << 62,
    "next_gid": 1 << 62,
}


def parse_meta(raw: dict[bytes, bytes]) -> tuple[dict[str, int], list[str]]:
    """``HGETALL meta`` -> (the fields as ints, problems): every field known,
    an integer, inside its `META_LIMITS` range."""
    meta: dict[str, int] = {}
    problems: list[str] = []
    for name, value in raw.items():
        field = name.decode(errors="replace")
        limit = META_LIMITS.get(field)
        try:
            v = int(value)
        except ValueError:
            problems.append(f"metadata {field}={value[:40]!r} is not an integer")
            continue
        if limit is None:
            problems.append(f"unknown metadata field {field!r}")
        elif not 0 <= v < limit:
            problems.append(f"metadata {field}={v} is out of range")
        else:
            meta[field] = v
    return meta, problems


class NamespaceError(RuntimeError):
    """The replay namespace cannot be used by this run; the message says why and what to do."""


@dataclass(frozen=True)
class ReplayIdentity:
    """What a replay namespace holds. Stored as the hash ``P identity``."""

    env_id: str
    num_actions: int
    codec: str
    n_step: int
    gamma: float
    frame_shape: str = "84x84"
    key_version: int = KEY_VERSION

    def to_redis(self) -> dict[str, str]:
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[bytes, bytes]) -> ReplayIdentity:
        """Parse ``HGETALL identity``; raises NamespaceError when it does not parse."""
        try:
            d = {k.decode(): v.decode() for k, v in raw.items()}
            return cls(
                env_id=d["env_id"],
                num_actions=int(d["num_actions"]),
                codec=d["codec"],
                n_step=int(d["n_step"]),
                gamma=float(d["gamma"]),
                frame_shape=d["frame_shape"],
                key_version=int(d["key_version"]),
            )
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            raise NamespaceError(f"its identity record does not parse ({exc!r})") from None

    def differences(self, other: ReplayIdentity) -> list[str]:
        """``"field: stored -> wanted"`` for every field that differs."""
        return [
            f"{k} {getattr(other, k)!r} (this run: {v!r})"
            for k, v in asdict(self).items()
            if getattr(other, k) != v
        ]


def _chunk_index(suffix: bytes) -> int | None:
    return int(suffix) if re.fullmatch(rb"[0-9]{1,12}", suffix) else None


def _type_name(typ: bytes | str) -> str:
    return typ.decode() if isinstance(typ, bytes) else str(typ)


def inspect_namespace(
    client: redis.Redis,
    keys: ReplayKeys,
    identity: ReplayIdentity | None,
    capacity: int,
    record_size: int,
    records_per_chunk: int,
    where: str,
) -> list[str]:
    """Problems that keep this run from using the namespace (empty list: usable).

    An empty namespace is usable. ``identity`` None skips the identity check.
    Raises `ReplayUnavailable` when Redis cannot be read.
    """
    problems: list[str] = []
    known = keys.names()
    n_chunks = -(-capacity // records_per_chunk)
    prefix = keys.prefix
    with replay_errors(where):
        # Every key of the namespace but frames (f:...), which are many and checked
        # when read. Bounded: at most the fixed names plus one key per chunk.
        limit = len(known) + n_chunks + MAX_PROBLEMS
        others: list[bytes] = []
        for key in client.scan_iter(match=prefix + b"[^f]*", count=1000):
            others.append(key)
            if len(others) > limit:
                problems.append(
                    f"more than {limit} keys under {prefix.decode()!r} that are not frames"
                )
                return problems
        frames_exist = next(iter(client.scan_iter(match=keys.frame_pattern(), count=1000)), None)
        pipe = client.pipeline(transaction=False)
        for key in others:
            pipe.type(key)
        types = pipe.execute() if others else []
        typeof = dict(zip(others, (_type_name(t) for t in types), strict=True))
        # read only as the type they should be: a meta key of another type is a
        # problem to report (exit 2 naming --replay-reset), not a WRONGTYPE traceback
        meta = client.hgetall(keys.meta) if typeof.get(keys.meta) == "hash" else {}
        ident_raw = client.hgetall(keys.identity) if typeof.get(keys.identity) == "hash" else {}
    for key, typ in zip(others, types, strict=True):
        typ = typ.decode() if isinstance(typ, bytes) else str(typ)
        suffix = key[len(prefix) :]
        if key in known:
            if typ != known[key]:
                problems.append(f"key {key!r} is a {typ}, expected a {known[key]}")
        elif suffix.startswith(b"rec:"):
            c = _chunk_index(suffix[4:])
            if c is None or c >= n_chunks:
                problems.append(
                    f"key {key!r} is not a record chunk of a capacity-{capacity} replay"
                )
            elif typ != "string":
                problems.append(f"key {key!r} is a {typ}, expected a string")
        else:
            problems.append(f"unknown key {key!r} under the replay's prefix")
        if len(problems) >= MAX_PROBLEMS:
            return problems
    # the run's lease, the shard's heartbeat and the insert budget are not data
    bookkeeping = {keys.owner, keys.heartbeat, keys.budget}
    has_data = any(k not in bookkeeping for k in others) or frames_exist is not None
    if not has_data:
        return problems
    if not meta or b"capacity" not in meta:
        problems.append("it holds replay keys but no metadata (capacity, slots)")
        return problems
    _, bad = parse_meta(meta)
    if bad:
        return problems + bad
    stored_cap = int(meta[b"capacity"])
    if stored_cap != capacity:
        problems.append(
            f"it holds a replay of capacity {stored_cap} per shard, this run wants {capacity} "
            f"(pass --capacity {stored_cap} x shards to reuse it)"
        )
    first, nxt = int(meta.get(b"first_slot", 0)), int(meta.get(b"next_slot", 0))
    if not first <= nxt <= first + stored_cap:
        problems.append(f"its slots are inconsistent (first {first}, next {nxt})")
    if identity is not None:
        if not ident_raw:
            problems.append("it has no identity record (written by an older apex-dqn?)")
        else:
            try:
                stored = ReplayIdentity.from_redis(ident_raw)
                diff = identity.differences(stored)
                if diff:
                    problems.append("it was made with other settings: " + "; ".join(diff))
            except NamespaceError as exc:
                problems.append(str(exc))
    if not problems:
        with replay_errors(where):
            pipe = client.pipeline(transaction=False)
            chunk_keys = [k for k in others if k[len(prefix) :].startswith(b"rec:")]
            for key in chunk_keys:
                pipe.strlen(key)
            lengths = pipe.execute() if chunk_keys else []
        for key, length in zip(chunk_keys, lengths, strict=True):
            c = _chunk_index(key[len(prefix) + 4 :])
            want = min(records_per_chunk, capacity - c * records_per_chunk) * record_size
            if int(length) != want:
                problems.append(f"record chunk {key!r} holds {length} bytes, expected {want}")
                break
    return problems


def reset_namespace(client: redis.Redis, keys: ReplayKeys, where: str) -> int:
    """Delete every key of the namespace (and nothing else); returns how many."""
    deleted = 0
    with replay_errors(where):
        batch: list[bytes] = []
        for key in client.scan_iter(match=keys.pattern(), count=5000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += int(client.unlink(*batch))
                batch = []
        if batch:
            deleted += int(client.unlink(*batch))
    return deleted


def namespace_refusal(url_shown: str, problems: list[str], namespace: str) -> str:
    """The message a refused run prints (names the fix)."""
    listed = "; ".join(problems[:MAX_PROBLEMS])
    return (
        f"the replay in {url_shown} (namespace {namespace!r}) cannot be used by this run: "
        f"{listed}. Use another --redis-url or --logdir, keep the run's settings, or pass "
        f"--replay-reset to delete that replay and start an empty one."
    )
