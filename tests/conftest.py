"""Shared pytest fixtures: a real Redis, a shared local Ray, real Pong frames.

* ``redis_server`` (session): an :class:`EmbeddedRedis` on a free port in a tmp dir.
* ``redis_url`` (function): that server's URL (the restricted ``apex`` user),
  FLUSHALLed before the test (``redis_server.admin_url`` may do anything).
* ``ray_local`` (session): ``ray.init(num_cpus=2)`` once (token auth disabled
  explicitly, no dashboard); shut down at the end. Yields the ``ray`` module.
* ``pong_frames`` (session): uint8[800, 84, 84] real Pong frames (8 envs x 100
  random steps, ``bench.synthetic.pong_frames``).
* ``make_pong_actor`` (function): factory for ``bench.synthetic.SyntheticActor``,
  closed after the test.
* ``tmpfs`` (function): ``tmpfs(size)`` mounts a real tmpfs of that size (``"16m"``)
  under the test's tmp dir and returns it; unmounted after the test; the test is
  skipped, saying why, where no tmpfs can be mounted (not root).
* ``bench.disks.fill_disk(disk)`` (for the tests that fill a ``tmpfs``): writes a
  filler file until ENOSPC and returns it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import redis

from bench.disks import mount_tmpfs, unmount
from bench.synthetic import SyntheticActor
from bench.synthetic import pong_frames as _pong_frames
from replay_server.redis_proc import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = EmbeddedRedis(str(tmp_path_factory.mktemp("redis")), appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    client = redis.Redis.from_url(redis_server.admin_url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        address="local",  # never join a cluster that `ray start` left on this machine
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 1024 * 1024,
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def pong_frames() -> np.ndarray:
    return _pong_frames(num_envs=8, steps=100)


@pytest.fixture
def make_pong_actor():
    made: list[SyntheticActor] = []

    def make(incarnation: int, **kw) -> SyntheticActor:
        actor = SyntheticActor(incarnation, **kw)
        made.append(actor)
        return actor

    yield make
    for a in made:
        a.close()


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"disk{len(mounted)}"
        why = mount_tmpfs(mnt, size)
        if why is not None:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {why}")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        unmount(mnt)
