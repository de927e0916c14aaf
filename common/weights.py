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
    training loop never stalls on the store's round trip.

    At most one call is in flight, so the store sees versions in order. While the
    previous call has not been answered (the store is restarting) a newer version
    is skipped (``publish`` returns False, ``skipped`` counts it: the actors get a
    later one); an error of the previous call is raised by the next ``publish``,
    and a call unanswered for ``timeout`` seconds raises ``TimeoutError`` there,
    so a dead store is said, never waited for forever. ``wait()`` blocks (up to
    ``timeout``) for the call in flight: for the first version, before the actors
    start."""

    def __init__(self, store: Any, timeout: float = 60.0):
        self._store = store
        self._timeout = timeout
        self._pending: Any = None
        self._sent_at = 0.0
        self.skipped = 0

    def publish(self, version: int, weights: dict[str, np.ndarray]) -> bool:
        import ray

        if self._pending is not None:
            ready, _ = ray.wait([self._pending], timeout=0)
            if not ready:
                if time.monotonic() - self._sent_at < self._timeout:
                    self.skipped += 1
                    return False
                self._pending = None
                raise TimeoutError(f"the weight store did not answer within {self._timeout:g} s")
            pending, self._pending = self._pending, None
            ray.get(pending)  # the previous call's error, if it failed
        self._pending = self._store.publish.remote(version, [ray.put(weights)])
        self._sent_at = time.monotonic()
        return True

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
    ``fetch_local=True``), so env stepping never stalls for it. A store that died
    (Ray restarts it: ``apex-weights`` has ``max_restarts=-1``) or weights that
    cannot be fetched cost nothing but time: the actor keeps acting with the
    weights it has and asks again (``failures`` counts such answers).
    """

    def __init__(self, store: Any):
        """store: a WeightStore actor handle, or the name of one (looked up lazily,
        so actors take a plain string as constructor argument and a restarted
        actor finds the store again)."""
        self._store = store
        self.version = -1
        self._pending_latest: Any = None  # ObjectRef of store.latest(...)
        self._pending_weights: tuple[int, Any] | None = None  # (version, ObjectRef)
        self.failures = 0

    def poll(self) -> tuple[int, dict[str, np.ndarray]] | None:
        import ray

        try:
            return self._poll()
        except ray.exceptions.RayError:  # the store died or restarts; the weights stay
            self.failures += 1
            self._pending_latest = self._pending_weights = None
            return None

    def _poll(self) -> tuple[int, dict[str, np.ndarray]] | None:
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
