"""The wire format: frame codecs and transition batches (real Pong frames)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from common.types import TransitionBatch
from common.wire import (
    CODEC_IDS,
    FrameCodec,
    WireError,
    decode_batch,
    encode_batch,
    train_zstd_dictionary,
)


@pytest.fixture(scope="module")
def dictionary(pong_frames):
    return train_zstd_dictionary(pong_frames[:400])


@pytest.mark.parametrize("name", list(CODEC_IDS))
def test_codec_round_trip_is_bit_exact(name, pong_frames, dictionary):
    codec = FrameCodec(name, dictionary if name == "zstd-dict" else None)
    frames = pong_frames[400:]
    blobs = codec.encode(frames)
    assert len(blobs) == len(frames)
    assert all(b[1] == CODEC_IDS[name] for b in blobs)
    out = codec.decode(blobs)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    assert np.array_equal(out, frames)
    if name != "none":
        assert np.mean([len(b) for b in blobs]) < frames[0].nbytes / 10  # Pong compresses >10x


def test_any_codec_decodes_mixed_frames(pong_frames, dictionary):
    frames = pong_frames[:12]
    blobs = []
    for i, name in enumerate(CODEC_IDS):
        blobs += FrameCodec(name, dictionary).encode(frames[3 * i : 3 * i + 3])
    reader = FrameCodec("lz4")
    with pytest.raises(WireError, match="dictionary"):
        reader.decode(blobs)
    reader.set_dictionary(dictionary)
    assert np.array_equal(reader.decode(blobs), frames)


@pytest.mark.parametrize("name", list(CODEC_IDS))
def test_decode_into_writes_each_frame_to_its_row_only(name, pong_frames, dictionary):
    codec = FrameCodec(name, dictionary if name == "zstd-dict" else None)
    frames = pong_frames[400:460]
    out = np.full((100, 84, 84), 7, np.uint8)
    rows = np.random.default_rng(0).permutation(100)[:60]
    codec.decode_into(codec.encode(frames), out, rows)
    assert np.array_equal(out[rows], frames)
    untouched = np.setdiff1d(np.arange(100), rows)
    assert (out[untouched] == 7).all()


def test_decode_into_mixed_codecs_and_bad_frames(pong_frames, dictionary):
    import lz4.block
    import zstandard

    frames = pong_frames[:12]
    blobs = []
    for i, name in enumerate(CODEC_IDS):
        blobs += FrameCodec(name, dictionary).encode(frames[3 * i : 3 * i + 3])
    reader = FrameCodec("lz4", dictionary)
    out = np.zeros((12, 84, 84), np.uint8)
    reader.decode_into(blobs, out, np.arange(12))
    assert np.array_equal(out, frames)
    lz4_frame, zstd_frame = blobs[3], blobs[6]
    over = bytes([0xA1, 1]) + lz4.block.compress(bytes(8000), store_size=False)
    huge = bytes([0xA1, 2]) + zstandard.ZstdCompressor().compress(bytes(10**7))
    unsized = bytes([0xA1, 2]) + zstandard.ZstdCompressor(write_content_size=False).compress(
        bytes(7056)
    )
    for bad, what in [
        (None, "not a valid frame"),
        (lz4_frame[:-20], "not a valid frame"),  # truncated
        (over, "not a valid frame"),  # more than one frame's bytes: never written
        (huge, "claims .* bytes, expected 7056"),  # checked before zstd allocates 10 MB
        (unsized, "claims .* bytes, expected 7056"),
        (zstd_frame[:-5], "zstd frames decoded to 7056 bytes"),
        (bytes([0xA1, 9]) + lz4_frame[2:], "unknown frame codec id 9"),
    ]:
        first = zstd_frame if bad is not None and bad[1:2] == b"\x02" else lz4_frame
        with pytest.raises(WireError, match=what):
            reader.decode_into([first, bad], out, np.array([0, 1]))
    with pytest.raises(ValueError, match="rows must lie"):
        reader.decode_into(blobs[:1], out, np.array([12]))


def test_bad_frames_raise_wire_error(pong_frames):
    codec = FrameCodec("lz4")
    good = codec.encode(pong_frames[:2])
    newer = bytes([0xA2]) + good[0][1:]
    with pytest.raises(WireError, match="version 2 is not supported"):
        codec.decode([good[0], newer])
    with pytest.raises(WireError, match="unknown frame codec id 9"):
        codec.decode([bytes([0xA1, 9]) + good[0][2:]])
    with pytest.raises(WireError, match="bad magic"):
        codec.decode([b"hello world"])
    with pytest.raises(WireError, match="corrupt"):
        codec.decode([good[0][:2] + b"\xff" * 40])
    with pytest.raises(WireError):
        codec.decode([good[0][:-20]])  # truncated
    with pytest.raises(WireError, match="NoneType.*not a valid frame"):
        codec.decode([good[0], None])
    with pytest.raises(WireError, match="unknown frame codec"):
        FrameCodec("gzip")
    with pytest.raises(WireError, match="needs a dictionary"):
        FrameCodec("zstd-dict")


def _batch(n: int, seed: int = 0) -> TransitionBatch:
    rng = np.random.default_rng(seed)
    return TransitionBatch(
        obs_ids=rng.integers(0, 2**50, (n, 4)),
        next_obs_ids=rng.integers(0, 2**50, (n, 4)),
        actions=rng.integers(0, 18, n),
        returns=rng.normal(size=n).astype(np.float32),
        discounts=np.full(n, 0.97, np.float32),
        priorities=rng.random(n).astype(np.float32) + 0.1,
    )


def test_batch_round_trip():
    b = _batch(37)
    fids = np.arange(5, dtype=np.int64) + (3 << 40)
    meta, out = decode_batch(encode_batch(b, actor=4, policy_version=11, frame_ids=fids))
    assert meta["v"] == 1 and meta["actor"] == 4 and meta["policy_version"] == 11
    assert np.array_equal(meta["frame_ids"], fids)
    for name in ("obs_ids", "next_obs_ids", "actions", "returns", "discounts", "priorities"):
        assert np.array_equal(getattr(out, name), getattr(b, name)), name
    out.validate()
    meta, empty = decode_batch(encode_batch(_batch(0), 0, 0))
    assert len(empty) == 0 and meta["frame_ids"].size == 0


def test_malformed_batches_raise_wire_error():
    good = msgpack.unpackb(encode_batch(_batch(3), 1, 1), raw=False)
    cases = {
        "not valid msgpack": b"\xc1\x00garbage",
        "must be a msgpack map": msgpack.packb(42),
        "exceeds max_array_len": msgpack.packb([1, 2, 3]),  # batches hold no arrays
        "version 2 is not supported": msgpack.packb({**good, "v": 2}),
        "'n' must be a non-negative int": msgpack.packb({**good, "n": -1}),
        "'obs_ids' has 96 bytes, expected 128": msgpack.packb({**good, "n": 4}),
        "'returns' must be bytes": msgpack.packb({**good, "returns": 1.5}),
        "version True is not supported": msgpack.packb({**good, "v": True}),
        "'n' must be a non-negative int, got 3.0": msgpack.packb({**good, "n": 3.0}),
        "'frame_ids' must be bytes": msgpack.packb({**good, "frame_ids": b"123"}),
    }
    for fragment, payload in cases.items():
        with pytest.raises(WireError, match=fragment):
            decode_batch(payload)


def test_batch_is_validated_on_encode():
    b = _batch(3)
    b.actions = b.actions.astype(np.int32)
    with pytest.raises(ValueError, match="actions"):
        encode_batch(b, 0, 0)
