"""One owner per logdir and per replay data directory (flock), with real processes:
the holder is a child process the test starts and kills with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from common.locks import DirLock, InUse
from replay_server.redis_proc import EmbeddedRedis

HOLD = """
import sys, time
from common.locks import DirLock
DirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A child process holding the lock of tmp_path/held (killed with SIGKILL)."""
    d = tmp_path / "held"
    d.mkdir()
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(d)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    assert child.stdout.readline().strip() == "held"
    yield d, child
    if child.poll() is None:
        child.kill()
        child.wait()


def test_a_held_directory_is_refused_naming_its_holder_until_it_dies(holder):
    d, child = holder
    with pytest.raises(InUse, match=f"pid {child.pid} on "):
        DirLock(str(d), "the logdir").acquire()
    os.kill(child.pid, signal.SIGKILL)  # a crash leaves no stale lock
    child.wait()
    deadline = time.monotonic() + 10
    while True:
        try:
            lock = DirLock(str(d)).acquire()
            break
        except InUse:
            assert time.monotonic() < deadline, "the lock outlived its holder"
            time.sleep(0.05)
    assert lock.held
    lock.release()


def test_train_refuses_a_logdir_in_use(holder, capsys):
    from deploy.cli import main

    d, child = holder
    code = main(["train", "--env", "ApexCatch-v0", "--logdir", str(d), "--max-updates", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"the logdir {d} is in use" in err and f"pid {child.pid}" in err


def test_two_servers_never_share_a_data_directory(tmp_path):
    with EmbeddedRedis(str(tmp_path / "shard-0")) as first:
        with pytest.raises(InUse, match="the replay data directory"):
            EmbeddedRedis(str(tmp_path / "shard-0"))
        assert first.alive
    with EmbeddedRedis(str(tmp_path / "shard-0")) as again:  # released at stop
        assert again.alive
