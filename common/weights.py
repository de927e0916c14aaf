"""Versioned weight broadcast from the learner to the actors.

`WeightStore` is a tiny plain class (wrapped as the named Ray actor
``apex-weights`` by the launcher) holding the newest ``(version, [ref])``. The
learner publishes with ``ray.put`` once per version and passes the ObjectRef
inside a list so Ray does not resolve it on the way; actors ask for the newest
version without blocking and fetch the weights (zero-copy numpy) from their
node's object store, so each node fetches each version once.

Call order:
  learner: WeightPublisher(store).publish(version, weights_to_numpy(model)): ray.put,
           then store.publish(version, [ref]) without waiting for its answer
  actor:   sub = WeightSubscriber(store_handle); every K steps: sub.poll()
           -> (version, weights) when a newer version has arrived, else None
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


class WeightStore:
    """Holds the newest published weights. Thread-safe enough for Ray (one writer)."""

    def __init__(self) -> None:
        self._version = -1
        self._refs: list[Any] = []
        self._published_at = 0.0

    def publish(self, version: int, refs: list[Any]) -> None:
        if version > self._version:
            self._version, self._refs, self._published_at = version, refs, time.time()

    def latest(self, have_version: int = -1) -> tuple[int, list[Any]] | None:
        """``(version, [ref])`` if newer than ``have_version``, else None."""
        if self._version > have_version:
            return self._version, self._refs
        return None

    def version(self) -> int:
        return self._version


class WeightPublisher:
    """Learner-side, non-blocking: ``publish(version, weights)`` puts the weights in
    the object store and tells the store without waiting for its answer, so the
    training loop never stalls on the store's round trip. At most one call is in
    flight: a newer version waits (up to ``timeout`` seconds) for the previous
    call's answer, so the store sees versions in order and a dead or unreachable
    store raises within the deadline instead of hanging (Ray's error, or
    ``TimeoutError``)."""

    def __init__(self, store: Any, timeout: float = 60.0):
        self._store = store
        self._timeout = timeout
        self._pending: Any = None

    def publish(self, version: int, weights: dict[str, np.ndarray]) -> None:
        import ray

        self.wait()
        self._pending = self._store.publish.remote(version, [ray.put(weights)])

    def wait(self) -> None:
        """Wait (bounded) for the call in flight, if any; raises its error."""
        import ray

        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        ready, _ = ray.wait([pending], timeout=self._timeout)
        if not ready:
            raise TimeoutError(f"the weight store did not answer within {self._timeout:g} s")
        ray.get(pending)


class WeightSubscriber:
    """Actor-side, non-blocking: at most one request in flight, never waits.

    ``poll()`` returns ``(version, weights: dict[str, np.ndarray])`` when a newer
    version has fully arrived, else None. The transfer of the weights themselves
    happens in Ray's object store in the background (``ray.wait`` with
    ``fetch_local=True``), so env stepping never stalls for it.
    """

    def __init__(self, store: Any):
        """store: a WeightStore actor handle, or the name of one (looked up lazily,
        so actors take a plain string as constructor argument and a restarted
        actor finds the store again)."""
        self._store = store
        self.version = -1
        self._pending_latest: Any = None  # ObjectRef of store.latest(...)
        self._pending_weights: tuple[int, Any] | None = None  # (version, ObjectRef)

    def poll(self) -> tuple[int, dict[str, np.ndarray]] | None:
        import ray

        if self._pending_weights is not None:
            version, ref = self._pending_weights
            ready, _ = ray.wait([ref], timeout=0, fetch_local=True)
            if not ready:
                return None
            self._pending_weights = None
            weights = ray.get(ref)
            self.version = version
            return version, weights
        if self._pending_latest is None:
            if isinstance(self._store, str):
                self._store = ray.get_actor(self._store)
            self._pending_latest = self._store.latest.remote(self.version)
            return None
        ready, _ = ray.wait([self._pending_latest], timeout=0)
        if not ready:
            return None
        answer = ray.get(self._pending_latest)
        self._pending_latest = None
        if answer is not None:
            version, refs = answer
            self._pending_weights = (version, refs[0])
            ray.wait([refs[0]], timeout=0, fetch_local=True)  # start the transfer
        return None
