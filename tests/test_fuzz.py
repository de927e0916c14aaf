"""Fuzz every decoder of hostile bytes: random bytes, bit flips of real Pong frames
and batches, truncations, and crafted headers (huge claimed sizes, wrong codec
ids, misaligned lengths, msgpack bombs). Only `WireError` may come out; what
decodes must be well-formed; no input makes a decoder allocate more than a valid
payload needs.

Adding cases: a `Target` is a name, the callable under test, the exception type
that counts as a clean rejection, a check run on every value that decoded, and a
case generator ``(rng, corpus) -> list[(kind, input)]``. Append a factory
``(corpus) -> Target`` to `TARGETS` (e.g. the replay shard's ingest and reload,
whose rejections are counted rather than raised); `test_fuzz_target` runs it and
`test_fuzz_total` counts it toward the 10,000-case floor. The 17,868 cases here
run in ~1 s on a 2-core machine, after ~7 s making the Pong frames (a session
fixture other test files share).
"""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import redis

from bench.synthetic import SyntheticActor
from common.types import FRAME_BYTES, FRAME_SHAPE, TransitionBatch
from common.wire import (
    CODEC_IDS,
    FrameCodec,
    WireError,
    decode_batch,
    encode_batch,
    train_zstd_dictionary,
)
from replay_server.namespace import NamespaceError, ReplayIdentity
from replay_server.records import RECORD_DTYPE
from replay_server.redis_proc import EmbeddedRedis
from replay_server.shard import ReplayShard
from replay_server.writer import ReplayWriter

Case = tuple[str, Any]  # (kind of case, the input)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass
class Corpus:
    """Real material to mutate: Pong frames, their encodings, real batches."""

    frames: np.ndarray  # uint8[m, 84, 84]
    dictionary: bytes
    blobs: dict[str, list[bytes]]  # codec name -> encoded frames
    batches: list[bytes]  # encode_batch outputs


@dataclass
class Target:
    name: str
    call: Callable[[Any], Any]
    cases: Callable[[np.random.Generator, Corpus], list[Case]]
    check: Callable[[Any, Any], None]  # (input, output) for inputs that decoded
    rejection: type[Exception] = WireError


# ---- mutations ----------------------------------------------------------------


def flip_bits(rng: np.random.Generator, blob: bytes, max_flips: int = 8) -> bytes:
    b = bytearray(blob)
    for _ in range(int(rng.integers(1, max_flips + 1))):
        i = int(rng.integers(0, len(b) * 8))
        b[i // 8] ^= 1 << (i % 8)
    return bytes(b)


def random_bytes(rng: np.random.Generator, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def mutate(rng: np.random.Generator, blob: bytes) -> tuple[str, bytes]:
    """One of: bit flips, truncation, extension, a random byte run spliced in."""
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return "bitflip", flip_bits(rng, blob)
    if kind == 1:
        return "truncate", blob[: int(rng.integers(0, len(blob)))]
    if kind == 2:
        return "extend", blob + random_bytes(rng, int(rng.integers(1, 64)))
    i = int(rng.integers(0, len(blob)))
    return "splice", blob[:i] + random_bytes(rng, int(rng.integers(1, 16))) + blob[i + 1 :]


def zstd_header(content_size: int | None, window_log: int = 10) -> bytes:
    """A zstd frame header (RFC 8878 3.1.1.1) claiming ``content_size`` bytes
    (None: unknown, with a window of 2**window_log), then one empty raw block."""
    if content_size is None:
        descriptor, window = 0x00, bytes([(window_log - 10) << 3])
        fcs = b""
    else:
        descriptor, window = 0xE0, b""  # 8-byte content size, single segment
        fcs = struct.pack("<Q", content_size)
    return ZSTD_MAGIC + bytes([descriptor]) + window + fcs + b"\x01\x00\x00"


# ---- frames -------------------------------------------------------------------


def frame_cases(codec: str) -> Callable[[np.random.Generator, Corpus], list[Case]]:
    def cases(rng: np.random.Generator, c: Corpus) -> list[Case]:
        blobs = c.blobs[codec]
        header = blobs[0][:2]
        out: list[Case] = []
        for _ in range(1200):  # mutations of real frames, alone or among good ones
            kind, bad = mutate(rng, blobs[int(rng.integers(0, len(blobs)))])
            if rng.random() < 0.5:
                out.append((kind, [bad]))
            else:
                batch = [blobs[int(i)] for i in rng.integers(0, len(blobs), 5)]
                batch[int(rng.integers(0, 5))] = bad
                out.append((kind + "-in-batch", batch))
        for _ in range(150):
            out.append(("random", [random_bytes(rng, int(rng.integers(0, 300)))]))
            out.append(("header+random", [header + random_bytes(rng, int(rng.integers(0, 300)))]))
        for codec_id in range(256):  # every codec id under a valid tag
            out.append(("codec-id", [bytes([header[0], codec_id]) + blobs[0][2:]]))
        for tag in range(0, 256, 5):
            out.append(("tag", [bytes([tag]) + blobs[0][1:]]))
        raw = c.frames[0].tobytes()
        plain = [bytes([header[0], CODEC_IDS["none"]]) + r for r in (raw + b"\0", raw[:-1])]
        out.append(("misaligned-7057+7055", plain))
        for size in (0, 1, FRAME_BYTES - 1, FRAME_BYTES + 1, 2**26, 2**40, 2**64 - 2):
            out.append(("zstd-claims", [bytes([header[0], 2]) + zstd_header(size)]))
            out.append(("zstd-dict-claims", [bytes([header[0], 3]) + zstd_header(size)]))
        for wlog in (10, 17, 20, 27, 31):
            out.append(("zstd-window", [bytes([header[0], 2]) + zstd_header(None, wlog)]))
        out += [
            ("not-bytes", [None]),
            ("not-bytes", [blobs[0], 12345]),
            ("not-bytes", ["a string frame"]),
            ("not-bytes", [blobs[0], blobs[1], None]),
            ("not-a-list", None),
            ("not-a-list", 7),
            ("not-a-list", {"a": 1}),
            ("empty-frame", [b""]),
            ("short-frame", [header]),
            ("memoryview", [memoryview(blobs[0])]),
            ("bytearray", [bytearray(blobs[1])]),
        ]
        return out

    return cases


def check_frames(inp: Any, out: Any) -> None:
    assert isinstance(out, np.ndarray) and out.dtype == np.uint8
    assert out.shape == (len(inp), *FRAME_SHAPE)


def frame_target(codec: str) -> Callable[[Corpus], Target]:
    def make(c: Corpus) -> Target:
        reader = FrameCodec(codec, c.dictionary if codec == "zstd-dict" else None)
        reader.set_dictionary(c.dictionary)  # reads zstd-dict frames whatever its own codec
        return Target(
            f"FrameCodec.decode[{codec}]", reader.decode, frame_cases(codec), check_frames
        )

    return make


def into_target(codec: str) -> Callable[[Corpus], Target]:
    """`FrameCodec.decode_into`, the loader's path: the same hostile frames, each
    decoded into its own row of a batch-sized array."""

    def make(c: Corpus) -> Target:
        reader = FrameCodec(codec, c.dictionary if codec == "zstd-dict" else None)
        reader.set_dictionary(c.dictionary)
        out = np.zeros((8, *FRAME_SHAPE), np.uint8)

        def call(blobs: Any) -> np.ndarray:
            n = len(blobs) if isinstance(blobs, list) else 1
            reader.decode_into(blobs, out, np.arange(n) % len(out))
            return out[:n]

        return Target(f"FrameCodec.decode_into[{codec}]", call, frame_cases(codec), check_frames)

    return make


# ---- batches ------------------------------------------------------------------


def batch_cases(rng: np.random.Generator, c: Corpus) -> list[Case]:
    good = msgpack.unpackb(c.batches[0], raw=False)
    out: list[Case] = []
    for _ in range(2500):
        out.append(mutate(rng, c.batches[int(rng.integers(0, len(c.batches)))]))
    for _ in range(200):
        out.append(("random", random_bytes(rng, int(rng.integers(0, 400)))))
    weird: list[Any] = [
        -1, 2**63, 2**64 - 1, True, 1.0, None, "3", b"\x00" * 8, {"n": 1}, float("nan")
    ]  # fmt: skip
    for key in ("v", "n", "actor", "policy_version", "frame_ids", "obs_ids", "returns"):
        for value in weird:
            out.append((f"field-{key}", msgpack.packb({**good, key: value})))
        out.append((f"missing-{key}", msgpack.packb({k: v for k, v in good.items() if k != key})))
    bombs = [
        ("array-2^32", b"\xdd\xff\xff\xff\xff"),
        ("map-2^32", b"\xdf\xff\xff\xff\xff"),
        ("bin-2^32", b"\xc6\xff\xff\xff\xff" + b"x" * 16),
        ("str-2^32", b"\xdb\xff\xff\xff\xff" + b"x" * 16),
        ("ext-2^32", b"\xc9\xff\xff\xff\xff\x01" + b"x" * 16),
        ("nested-arrays", b"\x91" * 100_000),
        ("nested-maps", b"\x81\xa1a" * 30_000),
        ("nils", b"\xdc\xff\xff" + b"\xc0" * 65_535),
        ("many-keys", msgpack.packb({f"k{i}": i for i in range(1000)})),
        ("long-key", msgpack.packb({"k" * 10_000: 1})),
        ("int-keys", msgpack.packb({1: 2})),
        ("bad-utf8-key", b"\x81\xa2\xff\xfe\x01"),
        ("ext-type", msgpack.packb(msgpack.ExtType(5, b"abc"))),
        ("timestamp", msgpack.packb({**good, "v": msgpack.Timestamp(1, 0)})),
    ]
    out += bombs
    n = good["n"]
    for claimed in (0, n - 1, n + 1, 2**31, 2**62):  # lengths that disagree with n
        out.append(("n-mismatch", msgpack.packb({**good, "n": claimed})))
    out += [("not-bytes", x) for x in (None, 5, "text", [1, 2], {"v": 1})]
    out.append(("memoryview", memoryview(c.batches[0])))
    return out


def check_batch(inp: Any, out: Any) -> None:
    meta, batch = out
    assert isinstance(batch, TransitionBatch)
    batch.validate()
    assert meta["frame_ids"].dtype == np.int64 and meta["frame_ids"].ndim == 1


def batch_target(c: Corpus) -> Target:
    return Target("decode_batch", decode_batch, batch_cases, check_batch)


# ---- dictionaries (loaded from the replay's Redis, so untrusted too) -----------


def dictionary_cases(rng: np.random.Generator, c: Corpus) -> list[Case]:
    out: list[Case] = [mutate(rng, c.dictionary) for _ in range(300)]
    out += [("random", random_bytes(rng, int(rng.integers(0, 2000)))) for _ in range(50)]
    out += [("not-bytes", x) for x in (None, 3, "dict")]
    out.append(("huge", b"\x37\xa4\x30\xec" + b"\0" * (2 << 20)))
    return out


def dictionary_target(c: Corpus) -> Target:
    frames = FrameCodec("zstd-dict", c.dictionary).encode(c.frames[:4])

    def install_and_decode(d: Any) -> np.ndarray:
        codec = FrameCodec("lz4")
        codec.set_dictionary(d)
        return codec.decode(frames)  # a wrong dictionary must fail as WireError too

    def check(_: Any, out: Any) -> None:
        check_frames(frames, out)

    return Target("set_dictionary+decode", install_and_decode, dictionary_cases, check)


TARGETS: list[Callable[[Corpus], Target]] = [
    *(frame_target(name) for name in CODEC_IDS),
    *(into_target(name) for name in CODEC_IDS),
    batch_target,
    dictionary_target,
]
TARGET_IDS = (
    [f"frames-{n}" for n in CODEC_IDS] + [f"into-{n}" for n in CODEC_IDS] + ["batch", "dictionary"]
)


@pytest.fixture(scope="module")
def corpus(pong_frames) -> Corpus:
    dictionary = train_zstd_dictionary(pong_frames[:400])
    frames = pong_frames[400:]
    blobs = {name: FrameCodec(name, dictionary).encode(frames[:200]) for name in CODEC_IDS}
    rng = np.random.default_rng(7)
    batches = []
    for n in (1, 5, 40):
        batch = TransitionBatch(
            obs_ids=rng.integers(0, 2**50, (n, 4)),
            next_obs_ids=rng.integers(0, 2**50, (n, 4)),
            actions=rng.integers(0, 6, n),
            returns=rng.normal(size=n).astype(np.float32),
            discounts=np.full(n, 0.97, np.float32),
            priorities=rng.random(n).astype(np.float32) + 0.1,
        )
        fids = np.arange(n, dtype=np.int64) + (5 << 40)
        batches.append(encode_batch(batch, actor=2, policy_version=9, frame_ids=fids))
    return Corpus(frames, dictionary, blobs, batches)


def run_target(target: Target, cases: list[Case]) -> Counter:
    """Every case once; anything but a clean rejection fails with the case named."""
    seen: Counter = Counter()
    for kind, inp in cases:
        try:
            out = target.call(inp)
        except target.rejection:
            seen["rejected"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(
                f"{target.name}: {kind} case raised {type(exc).__name__}: {exc} "
                f"(input {str(inp)[:200]})"
            )
        target.check(inp, out)
        seen["decoded"] += 1
    return seen


@pytest.mark.parametrize("make", TARGETS, ids=TARGET_IDS)
def test_fuzz_target(make, corpus):
    target = make(corpus)
    cases = target.cases(np.random.default_rng(zlib.crc32(target.name.encode())), corpus)
    seen = run_target(target, cases)
    assert seen["rejected"] > 0 and seen["decoded"] > 0, seen  # both paths exercised


def test_fuzz_total(corpus):
    total = sum(len(make(corpus).cases(np.random.default_rng(0), corpus)) for make in TARGETS)
    assert total >= 10_000, total


# ---- the findings, named --------------------------------------------


@pytest.mark.parametrize("codec", ["zstd", "zstd-dict"])
def test_zstd_header_claiming_a_huge_size_allocates_nothing(codec, corpus):
    reader = FrameCodec(codec, corpus.dictionary)
    good = reader.encode(corpus.frames[:1])[0]
    for claimed in (2**26, 2**40):
        crafted = good[:2] + zstd_header(claimed)
        tracemalloc.start()
        try:
            with pytest.raises(WireError, match=f"claims {claimed} bytes"):
                reader.decode([crafted])
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 1 << 20, peak  # main allocated the claimed 64 MiB before failing


def test_frames_of_7057_and_7055_bytes_are_refused(corpus):
    raw = corpus.frames[0].tobytes()
    for codec in ("none", "zstd"):
        c = FrameCodec(codec)
        if codec == "none":
            pair = [c.encode(corpus.frames[:1])[0] + b"\0", c.encode(corpus.frames[:1])[0][:-1]]
        else:  # zstd frames whose headers honestly claim 7,057 and 7,055 bytes
            import zstandard

            z = zstandard.ZstdCompressor(level=3)
            head = c.encode(corpus.frames[:1])[0][:2]
            pair = [head + z.compress(raw + b"\0"), head + z.compress(raw[:-1])]
        with pytest.raises(WireError, match="decodes to|claims"):
            c.decode(pair)


def test_msgpack_bomb_builds_nothing_big():
    bomb = b"\xdc\xff\xff" + b"\xc0" * 65_535  # an array of 65,535 nils: 0.5 MB of list
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="max_array_len"):
            decode_batch(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(bomb), peak


# ---- the replay shard: ingest of hostile pushes, reload of a corrupted Redis -----
#
# Rejections here are counted by the shard, not raised: after every case the
# shard must still be consistent (every stored record valid, sampling works) and
# every push must be accounted for (decoded and received, or malformed).

SHARD_CAP = 512
IDENTITY = ReplayIdentity("PongNoFrameskip-v4", 6, "lz4", 3, 0.99)


@pytest.fixture(scope="module")
def fuzz_redis(tmp_path_factory):
    server = EmbeddedRedis(str(tmp_path_factory.mktemp("fuzz-redis")), appendonly=False)
    yield server
    server.stop()


def _fresh_replay(server, pong_frames):
    """An empty namespace, a shard, and real pushes (their frames stored)."""
    admin = redis.Redis.from_url(server.admin_url)
    admin.flushall()
    shard = ReplayShard(server.url, SHARD_CAP, identity=IDENTITY, seed=0)
    writer = ReplayWriter(server.url)
    actor = SyntheticActor(writer.incarnation, num_envs=2, frame_pool=pong_frames)
    pushes = []
    for _ in range(6):
        fids, frames, batch = actor.push(8)
        writer.push(fids, frames, batch, 0, 0)
        pushes.append(encode_batch(batch, 0, 0, fids))
    while shard.ingest():
        pass
    return admin, shard, writer, pushes


def assert_consistent(shard: ReplayShard) -> None:
    assert 0 <= shard.size <= SHARD_CAP
    assert np.isfinite(shard.index.tree.total) and shard.index.tree.total >= 0
    s = shard.sample(64)
    if len(s):
        assert ((s.actions >= 0) & (s.actions < IDENTITY.num_actions)).all()
        assert ((s.discounts >= 0) & (s.discounts <= 1)).all() and np.isfinite(s.returns).all()
        assert (s.keys >= shard.index.first).all() and (s.keys < shard.index.next).all()


def hostile_pushes(rng: np.random.Generator, pushes: list[bytes], incarnation: int) -> list[Case]:
    good = msgpack.unpackb(pushes[0], raw=False)
    n = good["n"]
    out: list[Case] = [mutate(rng, pushes[int(rng.integers(0, len(pushes)))]) for _ in range(700)]
    out += [("random", random_bytes(rng, int(rng.integers(0, 300)))) for _ in range(100)]

    def field(name: str, dtype: str, value: Any) -> bytes:
        arr = np.frombuffer(good[name], dtype).copy()
        arr[int(rng.integers(0, arr.size))] = value
        return msgpack.packb({**good, name: arr.tobytes()})

    for value in (-5, 99, 6, 2**40, -(2**62)):
        out.append(("action", field("actions", "<i8", value)))
    for value in (1e30, -0.5, 1.0001, np.nan, np.inf):
        out.append(("discount", field("discounts", "<f4", value)))
    for value in (3e38, -1.0, np.nan, np.inf, 1e7):
        out.append(("priority", field("priorities", "<f4", value)))
    for value in (np.inf, -np.inf, np.nan, 1e20):
        out.append(("return", field("returns", "<f4", value)))
    for value in (0, -1, 2**62, (incarnation + 99) << 40):
        out.append(("frame-ref", field("obs_ids", "<i8", value)))
    for ids in (
        np.arange(4, dtype=np.int64) + ((incarnation + 7) << 40),  # another writer's
        np.array([1, 5, 9], np.int64) + (incarnation << 40),  # not one run
        np.array([-3, -2, -1], np.int64),
        np.arange(2**16, dtype=np.int64) + (incarnation << 40),  # a giant claimed run
    ):
        out.append(("frame-ids", msgpack.packb({**good, "frame_ids": ids.astype("<i8").tobytes()})))
    for claimed in (0, n + 1, 2**31):
        out.append(("n", msgpack.packb({**good, "n": claimed})))
    return out


def test_fuzz_shard_ingest(fuzz_redis, pong_frames):
    admin, shard, writer, pushes = _fresh_replay(fuzz_redis, pong_frames)
    cases = hostile_pushes(np.random.default_rng(11), pushes, writer.incarnation)
    keys = shard.keys
    for start in range(0, len(cases), 16):  # 16 pushes per ingest round
        chunk = cases[start : start + 16]
        before = shard.stats()
        admin.rpush(keys.incoming, *[inp for _, inp in chunk])
        try:
            while shard.ingest():
                pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"ingest of {[k for k, _ in chunk]} raised {type(exc).__name__}: {exc}")
        after = shard.stats()
        assert admin.llen(keys.incoming) == 0  # every push consumed
        took = (after.malformed - before.malformed) + (after.received > before.received)
        assert took >= 1, [k for k, _ in chunk]  # counted, not silently lost
        assert after.inserted_total - before.inserted_total <= after.received - before.received
        assert_consistent(shard)
    st = shard.stats()
    assert st.malformed > 100 and st.rejected > 10 and st.dangling > 0, st
    assert len(cases) >= 800


def corruptions(rng: np.random.Generator, admin: redis.Redis, keys) -> list[Case]:
    """(kind, (key, new value or None to delete, redis type)) for one stored key."""
    stored = {
        "meta": admin.hgetall(keys.meta),
        "groups": admin.hgetall(keys.groups),
        "identity": admin.hgetall(keys.identity),
    }
    chunk = admin.get(keys.records(0))
    prio = admin.get(keys.priorities)
    out: list[Case] = []
    for name, value in stored["meta"].items():
        for bad in (b"-1", b"x", b"1e9", str(2**63).encode(), str(2**45).encode(), b""):
            out.append((f"meta-{name.decode()}", ("hset", keys.meta, {name: bad})))
        out.append(
            (f"meta-{name.decode()}-bits", ("hset", keys.meta, {name: flip_bits(rng, value)}))
        )
    out.append(("meta-unknown-field", ("hset", keys.meta, {b"zzz": b"1"})))
    for gid, value in list(stored["groups"].items())[:3]:
        for _ in range(8):
            out.append(("group", ("hset", keys.groups, {gid: mutate(rng, value)[1]})))
        huge = struct.pack("<qqq", 0, 1 << 40, 1 << 36)  # claims 2**36 frame ids
        out.append(("group-huge", ("hset", keys.groups, {gid: huge})))
    for _ in range(20):
        out.append(("chunk", ("set", keys.records(0), mutate(rng, chunk)[1])))
    records = np.frombuffer(chunk, RECORD_DTYPE).copy()
    for fieldname, value in (
        ("action", 99),
        ("action", -1),
        ("disc", 1e30),
        ("prio", np.nan),
        ("ret", np.inf),
    ):
        bad = records.copy()
        bad[fieldname][int(rng.integers(0, 40))] = value
        out.append((f"record-{fieldname}", ("set", keys.records(0), bad.tobytes())))
    for _ in range(10):
        out.append(("priorities", ("set", keys.priorities, mutate(rng, prio)[1])))
    out.append(("priorities-claim", ("set", keys.priorities, struct.pack("<qq", 0, 2**40))))
    for _ in range(4):
        out.append(("identity", ("hset", keys.identity, {b"n_step": random_bytes(rng, 4)})))
    out.append(("identity-other-game", ("hset", keys.identity, {b"env_id": b"ALE/Breakout-v5"})))
    out.append(("foreign-chunk", ("set", keys.records(10**9), b"x")))
    out.append(("wrong-type", ("del+lpush", keys.meta, b"x")))
    return out


def test_fuzz_shard_reload(fuzz_redis, pong_frames):
    admin, shard, _, _ = _fresh_replay(fuzz_redis, pong_frames)
    shard.snapshot()
    names = [k for k in admin.scan_iter(match=shard.keys.pattern(), count=1000)]
    saved = {k: admin.dump(k) for k in names}
    cases = corruptions(np.random.default_rng(5), admin, shard.keys)
    refused = loaded = 0
    for kind, (op, key, value) in cases:
        pipe = admin.pipeline(transaction=False)
        pipe.flushall()
        for k, dumped in saved.items():
            pipe.restore(k, 0, dumped)
        pipe.execute()
        if op == "hset":
            admin.hset(key, mapping=value)
        elif op == "set":
            admin.set(key, value)
        else:
            admin.delete(key)
            admin.lpush(key, value)
        measure = "huge" in kind or "claim" in kind or kind.startswith("meta-")
        if measure:
            tracemalloc.start()
        try:
            fresh = ReplayShard(fuzz_redis.url, SHARD_CAP, identity=IDENTITY, seed=0)
            peak = tracemalloc.get_traced_memory()[1] if measure else 0
        except NamespaceError:
            refused += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"reload after {kind} raised {type(exc).__name__}: {exc}")
        finally:
            if measure:
                tracemalloc.stop()
        assert peak < 32 << 20, (kind, peak)  # bounded: no claimed size is allocated
        assert_consistent(fresh)
        loaded += 1
    assert refused > 10 and loaded > 10, (refused, loaded)
