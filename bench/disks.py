"""Small real filesystems to fill: a tmpfs mounted for a fault (root only), and a
filler file written until ENOSPC. Used by `bench.faults` (``--only disk``) and by
the disk-full tests (``tests/conftest.py``)."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path


def mount_tmpfs(where: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` (``"16m"``) at ``where`` (made if missing).
    Returns None, or why it could not (not root, no ``mount``)."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
    except OSError as exc:
        return f"cannot run mount: {exc}"
    if res.returncode != 0:
        return res.stderr.strip() or f"mount exited with {res.returncode}"
    return None


def unmount(where: Path) -> None:
    """Unmount ``where`` (lazily: a process may still hold a file there)."""
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True)


def fill_disk(disk: Path) -> Path:
    """Write a filler file in ``disk`` until the disk is full (ENOSPC); returns it
    (unlink it to give the space back). Raises RuntimeError if, after ENOSPC, a
    64 KB file still fits (the disk was not really full)."""
    filler = disk / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush at close
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    probe = disk / "probe"
    try:
        probe.write_bytes(b"x" * 65536)
    except OSError:
        return filler
    finally:
        probe.unlink(missing_ok=True)
    raise RuntimeError(f"{disk} still had room after ENOSPC")
