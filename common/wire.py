"""The versioned wire format between actors, the replay and the learner.

Two things cross the wire, and neither is ever pickled:

* **Frames**: one 84x84 uint8 frame per Redis value, compressed by a
  :class:`FrameCodec`. Every encoded frame starts with a 2-byte header
  ``[0xA0 | FRAME_VERSION, codec_id]`` so any reader can decode any frame (a
  store may hold frames of several codecs, e.g. ``zstd`` frames written before a
  ``zstd-dict`` dictionary existed) and reject bytes that are not a frame.
* **Transition batches**: a msgpack map ``{"v": BATCH_VERSION, "actor": int,
  "policy_version": int, "n": int, <field>: raw little-endian bytes, ...}``
  holding a :class:`~common.types.TransitionBatch` that refers to frames by id.

Anything malformed raises :class:`WireError` with a message saying what was
wrong, and nothing else leaves this module's decoders (``FrameCodec.decode``,
``decode_batch``, ``FrameCodec.set_dictionary``) for any input; callers on the
replay side count and skip such payloads. Decoders bound what they allocate by
what a valid payload needs (a frame: 7,056 bytes, whatever its header claims; a
batch: the bytes it arrived in), so hostile bytes cannot exhaust memory
(``tests/test_fuzz.py``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import cramjam
import lz4.block
import msgpack
import numpy as np
import zstandard

from common.types import FRAME_BYTES, FRAME_SHAPE, STACK, TransitionBatch

FRAME_VERSION = 1
BATCH_VERSION = 1
_MAGIC = 0xA0
_FRAME_TAG = _MAGIC | FRAME_VERSION
CODEC_IDS: dict[str, int] = {"none": 0, "lz4": 1, "zstd": 2, "zstd-dict": 3}
CODEC_NAMES = {v: k for k, v in CODEC_IDS.items()}
ZSTD_LEVEL = 3
# zstd frames of one 84x84 frame need a 7 KB window; refusing larger windows keeps a
# crafted header from making the decoder allocate its default limit (128 MiB).
ZSTD_MAX_WINDOW = 1 << 17
MAX_DICTIONARY_BYTES = 1 << 20  # trained dictionaries are 32 KB
# Batch messages: a map of a few short keys to ints and byte strings; no arrays.
_BATCH_KEYS_MAX = 32
_BATCH_KEY_LEN_MAX = 64

# TransitionBatch fields -> little-endian dtype and per-row shape on the wire.
_BATCH_FIELDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "obs_ids": ("<i8", (STACK,)),
    "next_obs_ids": ("<i8", (STACK,)),
    "actions": ("<i8", ()),
    "returns": ("<f4", ()),
    "discounts": ("<f4", ()),
    "priorities": ("<f4", ()),
}


class WireError(ValueError):
    """Bytes from the wire are not a valid frame or batch; the message says why."""


class FrameCodec:
    """Compress 84x84 uint8 frames to self-describing byte strings.

    ``name`` is one of ``lz4`` (default: fastest decode per byte saved), ``zstd``
    (level 3), ``zstd-dict`` (zstd with a dictionary trained per game, see
    :func:`train_zstd_dictionary`; needs ``dictionary``) and ``none``.

    ``decode`` accepts frames of *any* codec (the header names it); decoding a
    ``zstd-dict`` frame needs the dictionary, given here or later with
    :meth:`set_dictionary`. Instances are thread-safe for encode/decode (zstd
    contexts are per thread).
    """

    def __init__(self, name: str, dictionary: bytes | None = None) -> None:
        if name not in CODEC_IDS:
            raise WireError(f"unknown frame codec {name!r}; choose one of {', '.join(CODEC_IDS)}")
        if name == "zstd-dict" and dictionary is None:
            raise WireError(
                "codec zstd-dict needs a dictionary: train one with "
                "train_zstd_dictionary(frames) or load it from the replay's Redis"
            )
        self.name = name
        self.codec_id = CODEC_IDS[name]
        self._header = bytes([_FRAME_TAG, self.codec_id])
        self._dict_bytes: bytes | None = None
        self._dict: zstandard.ZstdCompressionDict | None = None
        self._local = threading.local()  # zstd (de)compressors are not thread-safe
        if dictionary is not None:
            self.set_dictionary(dictionary)

    @property
    def dictionary(self) -> bytes | None:
        return self._dict_bytes

    def set_dictionary(self, dictionary: bytes) -> None:
        """Install the zstd dictionary used by ``zstd-dict`` frames (bytes, at most
        ``MAX_DICTIONARY_BYTES``); raises :class:`WireError` for anything else."""
        if not isinstance(dictionary, bytes | bytearray | memoryview):
            raise WireError(f"zstd dictionary must be bytes, got {type(dictionary).__name__}")
        if not 8 <= len(dictionary) <= MAX_DICTIONARY_BYTES:
            raise WireError(
                f"zstd dictionary of {len(dictionary)} bytes; expected 8 to "
                f"{MAX_DICTIONARY_BYTES} (trained dictionaries are 32 KB)"
            )
        try:
            d = zstandard.ZstdCompressionDict(bytes(dictionary))
            d.precompute_compress(level=ZSTD_LEVEL)
        except zstandard.ZstdError as exc:
            raise WireError(f"invalid zstd dictionary ({len(dictionary)} bytes): {exc}") from None
        self._dict_bytes = bytes(dictionary)
        self._dict = d
        self._local = threading.local()

    def _zstd(
        self, with_dict: bool, compress: bool
    ) -> zstandard.ZstdCompressor | zstandard.ZstdDecompressor:
        """This thread's zstd context (created on first use)."""
        key = (with_dict, compress)
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = self._local.ctx = {}
        obj = ctx.get(key)
        if obj is None:
            d = self._dict if with_dict else None
            if with_dict and d is None:
                raise WireError(
                    "a zstd-dict frame needs the replay's dictionary; load it from Redis "
                    "(ReplayKeys.dictionary) and call FrameCodec.set_dictionary"
                )
            if compress:
                obj = zstandard.ZstdCompressor(level=ZSTD_LEVEL, dict_data=d, write_checksum=False)
            else:
                obj = zstandard.ZstdDecompressor(dict_data=d, max_window_size=ZSTD_MAX_WINDOW)
            ctx[key] = obj
        return obj

    # ---- encode ---------------------------------------------------------
    def encode(self, frames: np.ndarray) -> list[bytes]:
        """frames: uint8[m, 84, 84] -> m byte strings (header + payload)."""
        if frames.dtype != np.uint8 or frames.shape[1:] != FRAME_SHAPE:
            raise ValueError(
                f"frames: expected uint8[m, 84, 84], got {frames.dtype}{list(frames.shape)}"
            )
        frames = np.ascontiguousarray(frames)
        h = self._header
        raw = [frames[i].tobytes() for i in range(frames.shape[0])]
        if self.name == "lz4":
            comp = lz4.block.compress
            return [h + comp(r, store_size=False) for r in raw]
        if self.name in ("zstd", "zstd-dict"):
            c = self._zstd(self.name == "zstd-dict", compress=True).compress
        else:
            return [h + r for r in raw]
        return [h + c(r) for r in raw]

    # ---- decode ---------------------------------------------------------
    def decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        """m encoded frames -> a new uint8[m, 84, 84]: `decode_into` (the one
        decoder) into a fresh array. Raises :class:`WireError` on any bad frame."""
        try:
            m = len(blobs)
        except TypeError:
            raise WireError(
                f"frames: expected a sequence of byte strings, got {type(blobs).__name__}"
            ) from None
        out = np.empty((m, *FRAME_SHAPE), np.uint8)
        self.decode_into(blobs, out, np.arange(m))
        return out

    def decode_into(self, blobs: Sequence[bytes], out: np.ndarray, rows: np.ndarray) -> None:
        """Decode m encoded frames straight into ``out[rows[i]]``, with no
        intermediate bytes objects for lz4 (the sampler's hot path).

        out:   uint8[P, 84, 84], C-contiguous and writable (a batch, a shared slot)
        rows:  int[m], positions in [0, P) (a position written twice holds the later frame)

        Any codec (each frame's header names it). Every frame must decode to
        exactly 7,056 bytes, and no decoder can write more than that: lz4 and
        ``none`` write into the destination frame itself (bounded by its size);
        zstd frames must declare a 7,056-byte content size in their header, which
        zstd then enforces. When every frame is zstd of one kind, they are decoded
        as one stream into a reused buffer of exactly m frames and then copied to
        their rows (no per-frame allocation: measured faster, see the README).
        Raises :class:`WireError` on a bad frame (frames before it may already be
        written); the message names its index where it is known.
        """
        try:
            m = len(blobs)
        except TypeError:
            raise WireError(
                f"frames: expected a sequence of byte strings, got {type(blobs).__name__}"
            ) from None
        rows = np.asarray(rows)
        if out.dtype != np.uint8 or out.ndim != 3 or out.shape[1:] != FRAME_SHAPE:
            raise ValueError(f"out: expected uint8[P, 84, 84], got {out.dtype}{list(out.shape)}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be C-contiguous and writable")
        if rows.shape != (m,) or rows.dtype.kind not in "iu":
            raise ValueError(f"rows: expected int[{m}], got {rows.dtype}{list(rows.shape)}")
        if m == 0:
            return
        if int(rows.min()) < 0 or int(rows.max()) >= out.shape[0]:
            raise ValueError(
                f"rows must lie in [0, {out.shape[0]}), got {rows.min()}..{rows.max()}"
            )
        try:
            head = bytes(blobs[0][:2]) if isinstance(blobs[0], bytes) else b""
        except (TypeError, KeyError, IndexError):
            raise WireError(f"frames: cannot index a {type(blobs).__name__}") from None
        if len(head) == 2 and head[0] == _FRAME_TAG and head[1] in (2, 3):
            try:
                self._zstd_stream_into(blobs, out, rows, head)
                return
            except _Mixed:
                pass  # frames of several codecs: one at a time below
        dst = memoryview(out).cast("B")
        offsets = (rows.astype(np.int64) * FRAME_BYTES).tolist()
        fb = FRAME_BYTES
        into: dict[bytes, Callable[[memoryview, memoryview], None]] = {}
        i = 0
        try:
            for i, (blob, o) in enumerate(zip(blobs, offsets, strict=True)):  # noqa: B007 (i names the bad frame)
                head = bytes(blob[:2])  # TypeError for None: not a frame
                fn = into.get(head)
                if fn is None:
                    fn = into[head] = self._into_fn(blob)
                fn(memoryview(blob)[2:], dst[o : o + fb])
        except WireError as exc:
            raise WireError(f"frame {i} of {m}: {exc}") from None
        except (TypeError, ValueError, cramjam.DecompressionError, zstandard.ZstdError) as exc:
            what = type(blobs[i]).__name__
            raise WireError(
                f"frame {i} of {m} ({what}) is not a valid frame (corrupt or truncated): {exc}"
            ) from None

    def _zstd_stream_into(
        self, blobs: Sequence[bytes], out: np.ndarray, rows: np.ndarray, head: bytes
    ) -> None:
        """`decode_into` for m frames that all carry ``head`` (zstd or zstd-dict):
        each must declare 7,056 bytes (checked before anything is decoded; zstd
        enforces the declared size of every frame), and the stream must decode to
        exactly m frames. Raises _Mixed when a header differs."""
        size_of = zstandard.frame_content_size
        parts = []
        try:
            for i, b in enumerate(blobs):
                if b[:2] != head:  # TypeError for None: the per-frame path reports it
                    raise _Mixed
                p = memoryview(b)[2:]
                claimed = size_of(p)
                if claimed != FRAME_BYTES:
                    raise WireError(
                        f"frame {i}: zstd frame header claims {claimed} bytes, "
                        f"expected {FRAME_BYTES}"
                    )
                parts.append(p)
        except (TypeError, zstandard.ZstdError):
            raise _Mixed from None
        m, want = len(parts), len(parts) * FRAME_BYTES
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.size < want:
            buf = self._local.scratch = np.empty(want, np.uint8)
        view, got = memoryview(buf)[:want], 0
        try:
            reader = self._zstd(head[1] == 3, compress=False).stream_reader(
                b"".join(parts), read_across_frames=True
            )
            while got < want:
                n = reader.readinto(view[got:])
                if n == 0:
                    break
                got += n
            extra = reader.read(1)
        except zstandard.ZstdError as exc:
            raise WireError(f"corrupt {CODEC_NAMES[head[1]]} frame among {m}: {exc}") from None
        if got != want or extra:
            raise WireError(f"{m} zstd frames decoded to {got}{'+' if extra else ''} bytes")
        out[rows] = buf[:want].reshape(m, *FRAME_SHAPE)

    def _into_fn(self, blob: bytes) -> Callable[[memoryview, memoryview], None]:
        """The writer of frames with ``blob``'s header: (payload, 7,056-byte destination)."""
        if not isinstance(blob, bytes | bytearray | memoryview) or len(blob) < 2:
            raise WireError(f"not a frame: {type(blob).__name__} of length {_len(blob)}")
        tag, codec_id = blob[0], blob[1]
        if tag & 0xF0 != _MAGIC:
            raise WireError(
                f"not a frame: bad magic byte 0x{tag:02x} (expected 0x{_FRAME_TAG:02x}); "
                "the value was not written by apex-dqn's FrameCodec"
            )
        if tag != _FRAME_TAG:
            raise WireError(
                f"frame format version {tag & 0x0F} is not supported (this build reads "
                f"version {FRAME_VERSION}); run actors and learner from the same release"
            )
        if codec_id == 1:
            lz4_into = cramjam.lz4.decompress_block_into

            def lz4_frame(src: memoryview, dst: memoryview) -> None:
                # output_len given: without it cramjam may read a size prefix
                if lz4_into(src, dst, output_len=FRAME_BYTES) != FRAME_BYTES:
                    raise WireError(f"lz4 frame decodes to fewer than {FRAME_BYTES} bytes")

            return lz4_frame
        if codec_id in (2, 3):
            dd = self._zstd(codec_id == 3, compress=False)
            size_of = zstandard.frame_content_size

            def zstd_frame(src: memoryview, dst: memoryview) -> None:
                claimed = size_of(src)
                if claimed != FRAME_BYTES:  # checked before zstd allocates
                    raise WireError(
                        f"zstd frame header claims {claimed} bytes, expected {FRAME_BYTES}"
                    )
                dst[:] = dd.decompress(src)  # zstd checks the declared size

            return zstd_frame
        if codec_id == 0:

            def raw_frame(src: memoryview, dst: memoryview) -> None:
                if len(src) != FRAME_BYTES:
                    raise WireError(
                        f"raw frame decodes to {len(src)} bytes, expected {FRAME_BYTES}"
                    )
                dst[:] = src

            return raw_frame
        raise WireError(f"unknown frame codec id {codec_id}; known: {CODEC_NAMES}")


class _Mixed(Exception):
    """Internal: a frame's header differs from the codec's own (take the slow path)."""


def _len(x: object) -> int:
    try:
        return len(x)  # type: ignore[arg-type]
    except TypeError:
        return -1


def train_zstd_dictionary(frames: np.ndarray, size: int = 32768) -> bytes:
    """Train a zstd dictionary on uint8[m, 84, 84] frames (a few hundred suffice).

    Raises :class:`WireError` when zstd cannot train on so few/similar frames.
    """
    samples = [np.ascontiguousarray(f).tobytes() for f in frames]
    try:
        return zstandard.train_dictionary(size, samples, level=ZSTD_LEVEL).as_bytes()
    except zstandard.ZstdError as exc:
        raise WireError(
            f"cannot train a zstd dictionary from {len(samples)} frames: {exc}; "
            "give it more (a few hundred) frames"
        ) from None


# ---- transition batches ------------------------------------------------------


def encode_batch(
    batch: TransitionBatch,
    actor: int,
    policy_version: int,
    frame_ids: np.ndarray | None = None,
) -> bytes:
    """TransitionBatch -> msgpack bytes (arrays as raw little-endian bytes).

    frame_ids: int64[m], the ids of the frames stored together with this batch
    (the replay owns their lifetime from then on); None = no new frames.
    """
    batch.validate()
    fids = np.zeros(0, np.int64) if frame_ids is None else np.asarray(frame_ids)
    if fids.dtype != np.int64 or fids.ndim != 1:
        raise ValueError(f"frame_ids: expected int64[m], got {fids.dtype}{list(fids.shape)}")
    msg: dict[str, object] = {
        "v": BATCH_VERSION,
        "actor": int(actor),
        "policy_version": int(policy_version),
        "n": len(batch),
        "frame_ids": fids.astype("<i8").tobytes(),
    }
    for name, (dtype, _) in _BATCH_FIELDS.items():
        msg[name] = np.ascontiguousarray(getattr(batch, name), dtype=dtype).tobytes()
    return msgpack.packb(msg, use_bin_type=True)


def decode_batch(data: bytes) -> tuple[dict, TransitionBatch]:
    """msgpack bytes -> (meta, TransitionBatch).

    meta: {"v": int, "actor": int, "policy_version": int, "frame_ids": int64[m]}.

    The arrays are read-only views on ``data``. Raises :class:`WireError` for
    anything but a well-formed batch of this version; the msgpack reader is
    limited to what such a batch holds (one map of at most 32 short keys, byte
    strings no longer than ``data``, no arrays or extension types), so a crafted
    message cannot make it build more than a few objects.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise WireError(f"batch must be bytes, got {type(data).__name__}")
    try:
        msg = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=_BATCH_KEY_LEN_MAX,
            max_bin_len=len(data),
            max_array_len=0,
            max_map_len=_BATCH_KEYS_MAX,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError(f"batch is not valid msgpack ({len(data)} bytes): {exc}") from None
    if not isinstance(msg, dict):
        raise WireError(f"batch must be a msgpack map, got {type(msg).__name__}")
    v = msg.get("v")
    if type(v) is not int or v != BATCH_VERSION:
        raise WireError(
            f"batch format version {v!r} is not supported (this build reads version "
            f"{BATCH_VERSION}); run actors and replay from the same release"
        )
    n = msg.get("n")
    meta = {"v": v, "actor": msg.get("actor"), "policy_version": msg.get("policy_version")}
    for key, val in (
        ("n", n),
        ("actor", meta["actor"]),
        ("policy_version", meta["policy_version"]),
    ):
        if type(val) is not int or val < 0:
            raise WireError(f"batch field {key!r} must be a non-negative int, got {val!r}")
    fids = msg.get("frame_ids", b"")
    if not isinstance(fids, bytes) or len(fids) % 8:
        raise WireError("batch field 'frame_ids' must be bytes holding int64 ids")
    meta["frame_ids"] = np.frombuffer(fids, "<i8")
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, row) in _BATCH_FIELDS.items():
        raw = msg.get(name)
        if not isinstance(raw, bytes):
            raise WireError(f"batch field {name!r} must be bytes, got {type(raw).__name__}")
        width = np.dtype(dtype).itemsize * int(np.prod(row, dtype=np.int64))
        if len(raw) != n * width:
            raise WireError(
                f"batch field {name!r} has {len(raw)} bytes, expected {n * width} for n={n}"
            )
        arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(n, *row)
    batch = TransitionBatch(**arrays)
    try:
        batch.validate()
    except ValueError as exc:
        raise WireError(f"batch does not match TransitionBatch: {exc}") from None
    return meta, batch
