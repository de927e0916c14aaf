"""Every Redis key the replay uses, in one place (the rq way).

Layout of one shard's Redis (``P`` = ``"<namespace>:v<KEY_VERSION>:"``):

=========================  ======================================================
``P f:<8-byte id>``        one encoded frame (:class:`common.wire.FrameCodec`);
                           the id is the big-endian int64 frame id (binary keys
                           save ~10 B per frame over decimal)
``P incoming``             list of msgpack TransitionBatches (writers RPUSH; the
                           shard reads a prefix with LRANGE and removes it with
                           LTRIM in the MULTI that stores it)
``P rec:<chunk>``          binary string: ``RECORDS_PER_CHUNK`` fixed-size
                           transition records (see ``replay_server.shard``)
``P groups``               hash ``group id -> frame id runs`` of stored frames
``P epoch``                random token naming this copy of the replay's data: set
                           (NX) by the first writer or shard; every push checks it
                           atomically, so a writer registered with a Redis that
                           has since lost its data (restarted empty) can never
                           write into the new one (it registers again)
``P identity``             hash: what the namespace holds (key version, game,
                           frame shape, codec, n-step, gamma, actions); a run
                           with other settings is refused (`replay_server.namespace`)
``P incarnation``          counter; ``INCR`` gives each writer start a unique id
``P applied``              hash ``incarnation -> id of its last stored push``: a
                           push retried after its reply was lost is recognised
                           and not stored twice (`replay_server.writer`)
``P codec``                name of the codec the writers were started with
``P dict``                 the zstd dictionary of ``zstd-dict`` frames
``P prio``                 snapshot: ``int64 first_slot, int64 next_slot`` then
                           ``float32`` priorities in slot order
``P meta``                 hash: capacity, next_slot, inserted_total, ...
``P pushed``               counter: transitions writers pushed (INCRBY per push)
``P budget``               the learner's insert budget: writers that pushed more
                           than this wait (samples-per-insert on the insert side)
``P heartbeat``            the shard's liveness: its pid and time, written every
                           second with a 10 s TTL (a failing write is how the shard
                           notices a Redis that refuses writes while idle)
``P owner``                the run that owns this replay (`replay_server.lease`):
                           its host, driver pid and logdir, with a TTL the shard's
                           heartbeat refreshes; another run is refused while it lives
=========================  ======================================================

Bump :data:`KEY_VERSION` whenever the meaning of a key or record changes; a
reader of another version then simply sees an empty replay rather than
misreading data. Version 2 added ``epoch`` and ``identity`` and made pushes and
ingests atomic (Lua push, MULTI ingest that trims ``incoming`` only with its
writes).
"""

from __future__ import annotations

import numpy as np

KEY_VERSION = 2


class ReplayKeys:
    """Key names of one replay namespace. Immutable; cheap to construct."""

    def __init__(self, namespace: str = "apex") -> None:
        if not namespace or ":" in namespace:
            raise ValueError(f"namespace {namespace!r} must be non-empty and contain no ':'")
        self.namespace = namespace
        self.prefix = f"{namespace}:v{KEY_VERSION}:".encode()
        p = self.prefix
        self.frame_prefix = p + b"f:"
        self.incoming = p + b"incoming"
        self.record_prefix = p + b"rec:"
        self.groups = p + b"groups"
        self.epoch = p + b"epoch"
        self.identity = p + b"identity"
        self.incarnation = p + b"incarnation"
        self.applied = p + b"applied"
        self.codec = p + b"codec"
        self.dictionary = p + b"dict"
        self.priorities = p + b"prio"
        self.meta = p + b"meta"
        self.pushed = p + b"pushed"
        self.budget = p + b"budget"
        self.heartbeat = p + b"heartbeat"
        self.owner = p + b"owner"

    def frame(self, frame_id: int) -> bytes:
        """Key of one frame."""
        return self.frame_prefix + int(frame_id).to_bytes(8, "big", signed=True)

    def frames(self, frame_ids: np.ndarray) -> list[bytes]:
        """Keys of int64[m] frame ids, in order (vectorized byte packing)."""
        raw = np.ascontiguousarray(frame_ids, dtype=">i8").tobytes()
        p = self.frame_prefix
        return [p + raw[i : i + 8] for i in range(0, len(raw), 8)]

    def records(self, chunk: int) -> bytes:
        """Key of transition-record chunk number ``chunk``."""
        return self.record_prefix + str(int(chunk)).encode()

    def frame_pattern(self) -> bytes:
        """SCAN pattern matching every frame key."""
        return self.frame_prefix + b"*"

    def pattern(self) -> bytes:
        """SCAN pattern matching every key of this namespace (all versions excluded)."""
        return self.prefix + b"*"

    def names(self) -> dict[bytes, str]:
        """The fixed (non-frame, non-chunk) keys and their Redis types."""
        return {
            self.incoming: "list",
            self.groups: "hash",
            self.epoch: "string",
            self.identity: "hash",
            self.incarnation: "string",
            self.applied: "hash",
            self.codec: "string",
            self.dictionary: "string",
            self.priorities: "string",
            self.meta: "hash",
            self.pushed: "string",
            self.budget: "string",
            self.heartbeat: "string",
            self.owner: "string",
        }

    @staticmethod
    def frame_id(key: bytes) -> int:
        """Inverse of :meth:`frame`: the int64 id at the end of a frame key."""
        return int.from_bytes(key[-8:], "big", signed=True)
