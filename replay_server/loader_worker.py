"""A loader process: fetches and decodes batches' frames into shared memory.

Started by `replay_server.loader.BatchLoader` as ``python -m
replay_server.loader_worker TASKS RESULTS SLOTS`` (three inherited file
descriptors: a pipe to read tasks from, a pipe to write results to, and the
shared slot memory). Nothing secret is in argv: the Redis URLs (with their
passwords) arrive as the first message on the task pipe.

Messages (both directions) are ``uint32 length + msgpack map``; nothing is pickled:

* parent -> child, first: ``{"urls": [...], "namespace": str, "codec": str,
  "capacity": rows per slot, "slots": n}``; child answers ``{"ready": pid}``.
* parent -> child, then: ``{"t": seq, "slot": i, "n": rows, "spans": [[shard,
  first row, rows], ...]}``; the rows' frame ids are already in the slot
  (`SlotLayout.ids`). The child writes the frames and the ``ok`` mask into the
  slot and answers ``{"t": seq, "status": "ok", "missing": m, "corrupt": c,
  "cpu": its CPU seconds so far}``, or ``"outage"`` (the replay is unavailable:
  retry later) or ``"error"`` (a bug: the traceback is in ``"msg"``).

The child exits when the task pipe closes (the parent stopped or died).
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import struct
import sys
import time
import traceback
from typing import Any

import msgpack
import numpy as np

from common.types import FRAME_BYTES, FRAME_SHAPE, STACK

_LEN = struct.Struct("<I")
MAX_MESSAGE = 1 << 20


def _align(n: int, a: int = 4096) -> int:
    return -(-n // a) * a


def map_slots(fd: int, size: int) -> mmap.mmap:
    """Map the shared slot memory, its pages populated now (MAP_POPULATE on Linux):
    a first write to each 4 KB page of shared memory faults in every process that
    maps it, which made the first pass over the slots ~2x slower."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(fd, size, flags=flags)


class SlotLayout:
    """Byte layout of ``slots`` batch slots of ``capacity`` rows in one buffer.

    Each slot holds ``frames: uint8[2 * capacity * 4, 84, 84]`` (obs rows then
    next_obs rows, `replay_server.frames.stack_positions`), ``ids:
    int64[capacity, 8]`` and ``ok: bool[capacity]``.
    """

    def __init__(self, capacity: int, slots: int) -> None:
        if capacity < 1 or slots < 1:
            raise ValueError(f"capacity={capacity} and slots={slots} must be >= 1")
        self.capacity, self.slots = int(capacity), int(slots)
        self.frames_bytes = 2 * self.capacity * STACK * FRAME_BYTES
        self.ids_offset = _align(self.frames_bytes, 64)
        self.ok_offset = _align(self.ids_offset + self.capacity * 2 * STACK * 8, 64)
        self.slot_bytes = _align(self.ok_offset + self.capacity)
        self.total_bytes = self.slot_bytes * self.slots

    def frames(self, buf: Any, i: int) -> np.ndarray:
        off = i * self.slot_bytes
        arr = np.frombuffer(buf, np.uint8, self.frames_bytes, off)
        return arr.reshape(2 * self.capacity * STACK, *FRAME_SHAPE)

    def ids(self, buf: Any, i: int) -> np.ndarray:
        off = i * self.slot_bytes + self.ids_offset
        return np.frombuffer(buf, np.int64, self.capacity * 2 * STACK, off).reshape(
            self.capacity, 2 * STACK
        )

    def ok(self, buf: Any, i: int) -> np.ndarray:
        return np.frombuffer(buf, np.bool_, self.capacity, i * self.slot_bytes + self.ok_offset)


class Channel:
    """Length-prefixed msgpack messages over a pair of pipe file descriptors."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._buf = bytearray()

    def send(self, obj: dict) -> None:
        data = msgpack.packb(obj, use_bin_type=True)
        view = memoryview(_LEN.pack(len(data)) + data)
        while view:
            view = view[os.write(self.wfd, view) :]

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message; None after ``timeout`` s; EOFError when the pipe closed."""
        while True:
            msg = self._parse()
            if msg is not None:
                return msg
            if timeout is not None:
                ready, _, _ = select.select([self.rfd], [], [], timeout)
                if not ready:
                    return None
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError("the other end of the loader pipe closed")
            self._buf += chunk

    def _parse(self) -> dict | None:
        if len(self._buf) < 4:
            return None
        (n,) = _LEN.unpack_from(self._buf)
        if n > MAX_MESSAGE:
            raise ValueError(f"loader message of {n} bytes exceeds {MAX_MESSAGE}")
        if len(self._buf) < 4 + n:
            return None
        data = bytes(self._buf[4 : 4 + n])
        del self._buf[: 4 + n]
        msg = msgpack.unpackb(data, raw=False)
        if not isinstance(msg, dict):
            raise ValueError(f"loader message must be a map, got {type(msg).__name__}")
        return msg

    def close(self) -> None:
        for fd in (self.rfd, self.wfd):
            try:
                os.close(fd)
            except OSError:
                pass


def serve(tasks_fd: int, results_fd: int, slots_fd: int) -> None:
    """The child's loop, until the task pipe closes. Answers go out in task order.

    Pipelined: when the next task is already waiting, its MGETs are sent before
    the current task's replies are decoded, so Redis looks up one batch while this
    process decodes the other (measured: the loader's time per batch drops to
    about its own CPU time instead of its CPU time plus Redis's).
    """
    from collections import deque

    from replay_server.frames import FrameFetcher, PendingFetch
    from replay_server.protocol import ReplayUnavailable

    chan = Channel(tasks_fd, results_fd)
    try:
        init = chan.recv()
    except EOFError:
        return
    assert init is not None
    layout = SlotLayout(init["capacity"], init["slots"])
    buf = map_slots(slots_fd, layout.total_bytes)
    fetcher = FrameFetcher(init["urls"], init["namespace"], init["codec"])
    chan.send({"ready": os.getpid()})

    def begin(task: dict) -> PendingFetch | BaseException:
        slot, n = int(task["slot"]), int(task["n"])
        try:
            spans = [tuple(x) for x in task["spans"]]
            ids = layout.ids(buf, slot)[:n]
            return fetcher.begin(spans, ids, layout.frames(buf, slot), layout.capacity)
        except Exception as exc:  # noqa: BLE001 - answered in order by finish()
            return exc

    def finish(task: dict, begun: PendingFetch | BaseException) -> dict:
        reply: dict[str, Any] = {"t": task["t"]}
        try:
            if isinstance(begun, BaseException):
                raise begun
            res = fetcher.finish(begun)
            layout.ok(buf, int(task["slot"]))[: int(task["n"])] = res.ok
            reply.update(status="ok", missing=res.missing, corrupt=res.corrupt)
        except ReplayUnavailable as exc:
            reply.update(status="outage", msg=str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug: reported to the parent, which raises it
            reply.update(status="error", msg="".join(traceback.format_exception(exc)))
        reply["cpu"] = time.process_time()  # this process's CPU seconds so far
        return reply

    pending: deque[tuple[dict, PendingFetch | BaseException]] = deque()
    while True:
        try:
            task = chan.recv(timeout=0.0 if pending else None)
        except EOFError:
            break
        if task is not None:
            pending.append((task, begin(task)))
            if len(pending) < 2:
                continue  # begin the next one too if it is already waiting
        if pending:
            try:
                chan.send(finish(*pending.popleft()))
            except BrokenPipeError:
                break
    fetcher.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m replay_server.loader_worker TASKS RESULTS SLOTS", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    serve(*(int(a) for a in argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
