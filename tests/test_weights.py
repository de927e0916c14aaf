"""The weight broadcast on a real local Ray: the store (``apex-weights``) survives a
kill -9 of its process, the actor side keeps its weights meanwhile and never
raises, and the learner side neither blocks nor dies while it restarts."""

from __future__ import annotations

import os
import time

import numpy as np
import psutil
import pytest

from common.weights import WeightPublisher, WeightSubscriber


def store_process(store) -> psutil.Process:
    """The process of this test's store actor (by its own PID: other Ray clusters on
    the machine, e.g. a run another test left behind, have WeightStores too)."""
    import ray

    pid = ray.get(store.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)
    proc = psutil.Process(pid)
    assert proc.cmdline()[0].startswith("ray::WeightStore"), proc.cmdline()
    return proc


def poll_until(sub: WeightSubscriber, version: int, publish=None, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while sub.version < version:
        assert time.monotonic() < deadline, f"version {version} never arrived (have {sub.version})"
        if publish is not None:
            publish()
        sub.poll()  # never raises, whatever the store's state
        time.sleep(0.05)


@pytest.mark.slow
def test_the_weight_store_restarts_after_kill_9_and_actors_keep_their_weights(ray_local):
    import ray

    from deploy.fleet import WEIGHTS_NAME, start_weight_store

    store = start_weight_store()
    try:
        pub = WeightPublisher(store, timeout=30.0)
        assert pub.publish(1, {"w": np.full(4, 1.0, np.float32)})
        pub.wait()
        sub = WeightSubscriber(WEIGHTS_NAME)
        poll_until(sub, 1)

        proc = store_process(store)
        proc.kill()  # kill -9
        proc.wait(timeout=10)
        for _ in range(20):  # while it restarts: no exception, the old weights stay
            assert sub.poll() is None
            time.sleep(0.02)
        assert sub.version == 1

        state = {"v": 1}

        def publish() -> None:  # the learner's loop: one publish a period, never blocking
            state["v"] += 1
            t0 = time.monotonic()
            pub.publish(state["v"], {"w": np.full(4, float(state["v"]), np.float32)})
            assert time.monotonic() - t0 < 2.0, "publish blocked on a restarting store"

        poll_until(sub, 3, publish)
        assert ray.get(store.version.remote()) >= 3
        assert store_process(store).pid != proc.pid  # a new process
    finally:
        ray.kill(store)
