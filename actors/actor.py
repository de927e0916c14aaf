"""The Ape-X actor: E envs, local frame stacks, batched inference, n-step pushes.

`ApexActor` is a plain class; ``deploy/`` wraps it as the Ray actor
``apex-actor-<i>`` (``num_cpus=1, max_restarts=-1, max_concurrency=2`` so that
``stop`` and ``stats`` run while ``run`` does).

``run()`` loop, one iteration per vector step (each block timed into ``stats()["time"]``):

1. inference: Q(s, .) for the E current stacks, one batched CPU forward pass
   (``torch.inference_mode``, 1 thread). These Q-values also complete the
   priorities of the transitions emitted by the previous step (their s').
2. act epsilon-greedily per env (rates from `actors.exploration`).
3. env: step the E envs (one ALE thread); every returned frame is new and gets
   the next frame id; the NEXT_STEP ``reset`` rows start a new stack and yield
   no transition.
4. n-step (`common.nstep`) on clipped rewards, terminal at game over or (with
   ``--episodic-life``) a lost life; raw returns of whole games go to the episode log.
5. every ``push_every`` steps, encode + push all new frames and transitions in one
   round trip (`replay_server.writer.ReplayWriter`). When the replay is
   unreachable the data stays in a bounded local buffer (``local_buffer``
   transitions, oldest dropped and counted) and the push is retried with
   exponential backoff while the envs keep running.
6. every ``weight_poll_steps`` steps, a non-blocking weight poll.

Frame ids: the actor counts frames locally and turns the counters into global ids
``make_frame_id(incarnation, counter)`` at push time, so a replay that is down
when the actor starts does not stop it from acting. A restart (Ray reruns the
constructor) gets a new writer, hence a new incarnation and fresh ids.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import deque
from typing import Any

import numpy as np
import redis
import torch

from actors.exploration import Exploration
from actors.policy import ActingNetwork
from common.config import Config
from common.env import make_vector_env
from common.exploration import epsilon_greedy
from common.nstep import NStepAccumulator, PendingTransitions
from common.stacking import FrameStacker
from common.types import COUNTER_BITS, FRAME_SHAPE, TransitionBatch
from common.weights import WeightSubscriber
from replay_server.redis_proc import ReplayUnavailable
from replay_server.writer import ReplayWriter

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.25
BACKOFF_MAX_S = 10.0
THROTTLE_POLL_S = 0.05
THROTTLE_MAX_S = 5.0
_REPLAY_ERRORS = (ReplayUnavailable, redis.ConnectionError, redis.TimeoutError, OSError)


def _was_reconstructed() -> bool:
    """True when Ray restarted this actor (the constructor is running again)."""
    try:
        import ray

        if ray.is_initialized():
            with warnings.catch_warnings():  # Ray 2.60 warns inside its own property
                warnings.simplefilter("ignore")
                return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside a Ray actor
        pass
    return False


class ApexActor:
    """One actor process: E envs, their stacks, a CPU Q-network and a replay writer.

    cfg: the run's config (``env``, ``actor``, ``learner.dueling``, ``replay.codec``,
    ``run.seed``). actor_index: this actor's index in [0, num_actors).
    replay_url: the Redis of the replay shard this actor pushes to.
    weight_store: a handle of `common.weights.WeightStore` (Ray actor), or None to
    act with the initial random weights. num_actors: default ``cfg.actor.actors``.
    inference_dtype: auto | float32 | bfloat16 (see `actors.policy`).

    Thread-safety: ``run`` in one thread; ``stop`` and ``stats`` may be called from
    another one at any time.
    """

    def __init__(
        self,
        cfg: Config,
        actor_index: int,
        replay_url: str,
        weight_store: Any | None = None,
        num_actors: int | None = None,
        inference_dtype: str = "auto",
    ):
        torch.set_num_threads(1)
        self.cfg = cfg
        a = cfg.actor
        self.index = actor_index
        self.num_actors = num_actors or a.actors
        if not 0 <= actor_index < self.num_actors:
            raise ValueError(f"actor_index={actor_index} must be in [0, {self.num_actors})")
        self.num_envs = a.envs_per_actor
        self.replay_url = replay_url
        self.restarted = _was_reconstructed()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the counters/episode lists read by stats()
        self._started = False
        self._counter = 0  # frames produced by this incarnation
        self._pending: PendingTransitions | None = None
        self._out_frames: deque[tuple[np.ndarray, np.ndarray]] = deque()  # (counters, frames)
        self._out_trans: deque[TransitionBatch] = deque()  # ids still local counters
        self._buffered = 0
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._failing_since: float | None = None
        self._n = {"vector_steps": 0, "pushed": 0, "dropped": 0, "push_failed": 0, "pushes": 0}
        # seconds: env stepping, forward passes, batch assembly, writer.push (frame
        # compression + msgpack + the round trip), other (stacks, n-step, epsilon)
        self._time = {
            "env": 0.0, "inference": 0.0, "encode": 0.0, "push": 0.0, "throttle": 0.0, "other": 0.0,
        }  # fmt: skip
        self._writer: ReplayWriter | None = None
        self._try_connect()
        # Seeds: (run seed, actor index, restart salt). Ray exposes no restart count,
        # so a restarted actor salts with its writer incarnation (unique per start).
        salt = 0
        if self.restarted:
            salt = self._writer.incarnation if self._writer else int(time.time_ns() % 2**31)
        self.seed_salt = salt
        env_seed, act_seed, torch_seed = np.random.SeedSequence(
            [cfg.run.seed, actor_index, salt]
        ).generate_state(3)
        # ALE takes int32 seeds and seeds env j with seed + j: keep well below 2**31.
        self.env_seed = int(env_seed >> 2)
        self._env = make_vector_env(cfg.env, self.num_envs, seed=self.env_seed, num_threads=1)
        self.frame_skip = self._env.frame_skip  # emulator frames per env step
        self.num_actions = self._env.num_actions
        torch.manual_seed(int(torch_seed))
        self._policy = ActingNetwork(
            self.num_actions, cfg.learner.dueling, self.num_envs, inference_dtype
        )
        self._rng = np.random.default_rng(int(act_seed))
        self.exploration = Exploration(a, actor_index, self.num_actors)
        self._nstep = NStepAccumulator(self.num_envs, a.n_step, a.gamma)
        self._stacker = FrameStacker(self.num_envs)
        self._weight_store = weight_store
        self._subscriber = WeightSubscriber(weight_store) if weight_store is not None else None
        self.policy_version = 0  # tags pushes; 0 = the initial random weights
        self.last_actions = np.zeros(self.num_envs, np.int64)  # int64[E] of the last step
        self._ep_return = np.zeros(self.num_envs, np.float64)
        self._ep_length = np.zeros(self.num_envs, np.int64)
        self._episodes: list[tuple[float, int]] = []
        self._schedule_offset = 0  # frames of earlier incarnations / resumed runs
        self._eps = self.exploration.epsilons(0)

    # ---- public API ------------------------------------------------------
    def run(
        self,
        max_steps: int | None = None,
        stop_after_seconds: float | None = None,
        schedule_frames: int | None = None,
    ) -> dict:
        """Step the envs until ``stop()``, ``max_steps`` vector steps or the time limit.

        schedule_frames: env frames this actor index has produced before, over
        earlier incarnations (a restart after a crash) and resumed runs; a
        decaying epsilon schedule continues from there instead of starting over.
        None keeps the current position.

        Returns ``stats(reset_episodes=False)``. May be called again to continue.
        """
        self._stop.clear()
        if schedule_frames is not None:
            self._schedule_offset = max(0, int(schedule_frames) - self._own_frames())
        a = self.cfg.actor
        deadline = time.monotonic() + stop_after_seconds if stop_after_seconds else None
        if not self._started:
            self._start_episodes()
        rows = np.arange(self.num_envs)
        steps = 0
        while not self._stop.is_set():
            if max_steps is not None and steps >= max_steps:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            t0 = time.perf_counter()
            q = self._infer()
            t_inf = time.perf_counter()
            if self._pending is not None:
                self._queue(self._pending.complete(q))
            self._eps = self.exploration.epsilons(self.schedule_frames())
            actions = self.last_actions = epsilon_greedy(q, self._eps, self._rng)
            t1 = time.perf_counter()
            frames, raw, term, trunc, reset, life_lost = self._env.step(actions)
            t2 = time.perf_counter()
            counters = self._new_counters(frames)
            obs_ids = self._stacker.ids.copy()
            self._stacker.step(frames, counters, reset)
            active = ~reset
            rewards = np.sign(raw) if self.cfg.env.clip_rewards else raw
            self._pending = self._nstep.add(
                obs_ids, actions, rewards, q[rows, actions], self._stacker.ids,
                term | life_lost, trunc, active,
            )  # fmt: skip
            self._log_episodes(raw, term | trunc, active)
            t3 = time.perf_counter()
            steps += 1
            with self._lock:
                self._n["vector_steps"] += 1
                self._time["inference"] += t_inf - t0
                self._time["env"] += t2 - t1
                self._time["other"] += (t1 - t_inf) + (t3 - t2)
            if steps % a.push_every == 0:
                self._flush()
            if self._subscriber is not None and (
                steps % a.weight_poll_steps == 0 or steps % a.push_every == 0
            ):
                self._poll_weights()  # non-blocking; after each push too, as pushes may wait
        if self._pending is not None and len(self._pending):
            t0 = time.perf_counter()
            self._queue(self._pending.complete(self._infer()))
            self._time["inference"] += time.perf_counter() - t0
        self._pending = None
        self._flush(force=True)
        return self.stats(reset_episodes=False)

    def stop(self) -> None:
        """Make ``run`` return after its current step (thread-safe)."""
        self._stop.set()

    def stats(self, reset_episodes: bool = True) -> dict:
        """Counters since start; episodes (raw returns, lengths in steps) since the last call."""
        with self._lock:
            episodes = list(self._episodes)
            if reset_episodes:
                self._episodes.clear()
            n = dict(self._n)
            env_steps = n["vector_steps"] * self.num_envs
            return {
                "actor": self.index,
                "frames": self.frame_skip * env_steps,
                "env_steps": env_steps,
                "vector_steps": n["vector_steps"],
                "transitions_pushed": n["pushed"],
                "transitions_dropped": n["dropped"],
                "transitions_buffered": self._buffered,
                "pushes": n["pushes"],
                "pushes_failed": n["push_failed"],
                "replay_ok": self._failing_since is None,
                "weight_version": self.policy_version,
                "epsilon_min": float(np.min(self._eps)),
                "epsilon_max": float(np.max(self._eps)),
                "schedule_frames": self._schedule_offset + self.frame_skip * env_steps,
                "episode_returns": [r for r, _ in episodes],
                "episode_lengths": [n_ for _, n_ in episodes],
                "time": dict(self._time),
                "incarnation": self._writer.incarnation if self._writer else None,
                "restarted": self.restarted,
                "seed_salt": self.seed_salt,
                "inference_dtype": self._policy.dtype,
            }

    def schedule_frames(self) -> int:
        """Where the exploration schedule stands: frames of earlier incarnations
        and resumed runs (``run(schedule_frames=...)``) plus this incarnation's."""
        return self._schedule_offset + self._own_frames()

    def _own_frames(self) -> int:
        return self.frame_skip * self._n["vector_steps"] * self.num_envs

    def current_stacks(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stacks the network sees next: uint8[E, 4, 84, 84] and their
        frame ids int64[E, 4] (local counters until the first replay connection)."""
        base = np.int64(self._writer.incarnation) << np.int64(COUNTER_BITS) if self._writer else 0
        return self._stacker.obs.copy(), self._stacker.ids | base

    def epsilons(self) -> list[float]:
        """This actor's current per-env exploration rates."""
        return [float(e) for e in self._eps]

    def pid(self) -> int:
        import os

        return os.getpid()

    def close(self) -> None:
        self._env.close()
        if self._writer is not None:
            self._writer.close()

    # ---- stepping helpers --------------------------------------------------
    def _start_episodes(self) -> None:
        frames = self._env.reset()
        counters = self._new_counters(frames)
        self._stacker.reset(frames, counters)
        self._started = True

    def _new_counters(self, frames: np.ndarray) -> np.ndarray:
        """Give the E new frames their local counters and queue them for pushing."""
        counters = np.arange(self._counter, self._counter + len(frames), dtype=np.int64)
        self._counter += len(frames)
        self._out_frames.append((counters, frames.copy()))
        return counters

    def _infer(self) -> np.ndarray:
        """Q-values float32[E, A] of the current stacks."""
        return self._policy.q_values(self._stacker.obs)

    def _log_episodes(self, raw: np.ndarray, done: np.ndarray, active: np.ndarray) -> None:
        self._ep_return += np.where(active, raw, 0.0)
        self._ep_length += active
        finished = np.flatnonzero(done & active)
        if finished.size:
            with self._lock:
                for i in finished:
                    self._episodes.append((float(self._ep_return[i]), int(self._ep_length[i])))
            self._ep_return[finished] = 0.0
            self._ep_length[finished] = 0

    def _poll_weights(self) -> None:
        try:
            got = self._subscriber.poll()
        except Exception as exc:  # the store died or restarted: resubscribe, keep acting
            log.warning("actor %d: weight poll failed (%s); resubscribing", self.index, exc)
            have = self._subscriber.version
            self._subscriber = WeightSubscriber(self._weight_store)
            self._subscriber.version = have
            return
        if got is not None:
            version, weights = got
            self._policy.load(weights)
            with self._lock:
                self.policy_version = version

    # ---- replay side -------------------------------------------------------
    def _queue(self, batch: TransitionBatch) -> None:
        if len(batch):
            self._out_trans.append(batch)
            self._buffered += len(batch)

    def _try_connect(self) -> bool:
        if self._writer is not None:
            return True
        try:
            self._writer = ReplayWriter(self.replay_url, codec=self.cfg.replay.codec)
        except _REPLAY_ERRORS as exc:
            self._note_failure(exc)
            return False
        return True

    def _note_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            self._n["push_failed"] += 1
            first = self._failing_since is None
            if first:
                self._failing_since = now
        self._retry_at = now + self._backoff
        if first or self._backoff >= BACKOFF_MAX_S:
            log.warning(
                "actor %d: replay unreachable (%s); buffering up to %d transitions locally, "
                "retrying in %.2fs (%d buffered, %d dropped so far)",
                self.index, exc, self.cfg.actor.local_buffer, self._backoff,
                self._buffered, self._n["dropped"],
            )  # fmt: skip
        self._backoff = min(2 * self._backoff, BACKOFF_MAX_S)

    def _flush(self, force: bool = False) -> None:
        """Push everything queued in one round trip, or keep it (bounded) for a retry."""
        if not self._out_trans:
            return
        if time.monotonic() < self._retry_at and not force:
            self._bound_buffer()
            return
        if not self._try_connect():
            self._bound_buffer()
            return
        t0 = time.perf_counter()
        base = np.int64(self._writer.incarnation) << np.int64(COUNTER_BITS)
        if self._out_frames:
            counters = np.concatenate([c for c, _ in self._out_frames])
            frames = np.concatenate([f for _, f in self._out_frames])
        else:
            counters, frames = np.zeros(0, np.int64), np.zeros((0, *FRAME_SHAPE), np.uint8)
        batch = TransitionBatch.concat(list(self._out_trans))
        batch.obs_ids = batch.obs_ids | base
        batch.next_obs_ids = batch.next_obs_ids | base
        t1 = time.perf_counter()
        try:
            allowance = self._writer.push(
                counters | base, frames, batch, self.index, self.policy_version
            )
        except _REPLAY_ERRORS as exc:
            self._time["encode"] += t1 - t0
            self._time["push"] += time.perf_counter() - t1
            self._note_failure(exc)
            self._bound_buffer()
            return
        t2 = time.perf_counter()
        if self._failing_since is not None:
            log.warning(
                "actor %d: replay reachable again after %.1fs; pushed %d buffered transitions",
                self.index, time.monotonic() - self._failing_since, len(batch),
            )  # fmt: skip
        self._out_frames.clear()
        self._out_trans.clear()
        with self._lock:
            self._time["encode"] += t1 - t0
            self._time["push"] += t2 - t1
            self._n["pushed"] += len(batch)
            self._n["pushes"] += 1
            self._buffered = 0
            self._failing_since = None
        self._backoff = BACKOFF_START_S
        self._retry_at = 0.0
        self._throttle(*allowance)

    def _throttle(self, pushed: int, budget: int | None) -> None:
        """Wait while this shard's writers are ahead of the learner's insert budget.

        The learner keeps ``budget`` near ``sampled / samples_per_insert`` plus a
        tolerance (Reverb's SampleToInsertRatio, insert side), so adding actors
        does not change the replay ratio. The wait is bounded by
        ``THROTTLE_MAX_S`` per push, so a stalled learner never stops the actors
        for good, and ``stop()`` ends it at once.
        """
        if budget is None or pushed <= budget:
            return
        t0 = time.perf_counter()
        deadline = time.monotonic() + THROTTLE_MAX_S
        while pushed > budget and not self._stop.is_set() and time.monotonic() < deadline:
            self._stop.wait(THROTTLE_POLL_S)
            if self._subscriber is not None:
                self._poll_weights()  # a waiting actor still takes the newest weights
            try:
                pushed, budget = self._writer.allowance()
            except _REPLAY_ERRORS:
                break
            if budget is None:
                break
        with self._lock:
            self._time["throttle"] += time.perf_counter() - t0

    def _bound_buffer(self) -> None:
        """Drop the oldest transitions beyond ``local_buffer``, then the frames nobody needs."""
        limit = self.cfg.actor.local_buffer
        dropped = 0
        while self._buffered - dropped > limit:
            oldest = self._out_trans[0]
            excess = self._buffered - dropped - limit
            if len(oldest) <= excess:
                self._out_trans.popleft()
                dropped += len(oldest)
            else:
                self._out_trans[0] = _slice(oldest, excess)
                dropped += excess
        if dropped:
            with self._lock:
                self._n["dropped"] += dropped
                self._buffered -= dropped
        # Frames older than every id still referenced (buffered transitions, n-step
        # windows, pending transitions, current stacks) can never be needed again.
        refs = [self._stacker.ids.reshape(-1), self._nstep.held_ids()]
        refs += [t.obs_ids.reshape(-1) for t in self._out_trans]
        if self._pending is not None:
            refs.append(self._pending.obs_ids.reshape(-1))
        oldest_needed = min(int(r.min()) for r in refs if r.size)
        while self._out_frames and self._out_frames[0][0][-1] < oldest_needed:
            self._out_frames.popleft()


def _slice(batch: TransitionBatch, start: int) -> TransitionBatch:
    return TransitionBatch(
        obs_ids=batch.obs_ids[start:],
        next_obs_ids=batch.next_obs_ids[start:],
        actions=batch.actions[start:],
        returns=batch.returns[start:],
        discounts=batch.discounts[start:],
        priorities=batch.priorities[start:],
    )
