"""One owner per directory: an exclusive ``flock`` on ``<dir>/.lock``.

Two ``apex-dqn train`` runs on one logdir (two ``--resume`` of one checkpoint, a
reused ``--logdir``) would interleave checkpoints, and two embedded
redis-servers on one data directory would append to one AOF. `DirLock` makes
the second one fail at once, naming the holder (its pid and host, written into
the lock file). The kernel releases the lock when its holder exits, kill -9
included, so a crashed run never leaves a stale lock behind (the file's text
then names a process that is gone, and the next run takes the lock).
"""

from __future__ import annotations

import fcntl
import os
import socket


class InUse(RuntimeError):
    """Another process holds the directory's lock; the message names it."""


class DirLock:
    """``acquire()`` or raise `InUse`; ``release()``; a context manager too.

    what: how messages name the directory ("the logdir", "the replay data directory").
    The lock is held by this process only (the descriptor is not inherited).
    """

    def __init__(self, directory: str, what: str = "the directory") -> None:
        self.directory = directory
        self.what = what
        self.path = os.path.join(directory, ".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        if self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InUse(
                f"{self.what} {self.directory} is in use by another apex-dqn process "
                f"({holder}); two runs must not share it: stop the other run, or choose "
                "another --logdir (or --data-dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
