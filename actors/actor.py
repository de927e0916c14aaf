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
5. every ``push_every`` steps, seal all new frames (compressed) and transitions
   into one push for the `actors.outbox.ReplayOutbox`, whose own thread pushes
   them (one round trip each, idempotent) and keeps them while the replay is
   unavailable (bounded by ``local_buffer_mb``, oldest dropped and counted), so
   the envs never wait on Redis; then wait (bounded) while ahead of the
   learner's insert budget.
6. every ``weight_poll_steps`` steps, and after each push, a non-blocking weight
   poll.

Frame ids: the actor counts frames locally; the outbox turns the counters into
global ids ``make_frame_id(incarnation, counter)`` at push time, so a replay that
is down when the actor starts does not stop it from acting. A restart (Ray reruns
the constructor) gets a new writer, hence a new incarnation and fresh ids.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actors.exploration import Exploration
from actors.outbox import ReplayOutbox
from actors.policy import ActingNetwork
from common.config import Config
from common.env import make_vector_env
from common.exploration import epsilon_greedy
from common.nstep import NStepAccumulator, PendingTransitions
from common.stacking import FrameStacker
from common.types import TransitionBatch
from common.weights import WeightSubscriber

log = logging.getLogger(__name__)

DRAIN_S = 10.0  # at the end of `run` and at `close`: seconds to let the pushes finish


@dataclass
class ActorStats:
    """What `ApexActor.stats` reports (counters since this process started).

    frames / env_steps / vector_steps: emulator frames (frame skip counted for ALE),
        env steps (all E envs), vector steps
    transitions_pushed / _dropped / _buffered: acknowledged by Redis / dropped (the
        outage buffer was full, or they were left at close) / waiting in the
        outbox (`actors.outbox.OutboxStats`); buffered_bytes: the sealed part
    pushes_duplicate: retried pushes that Redis had stored already
    pushes / pushes_failed / replay_resets / replay_ok: see `OutboxStats`
    weight_version: the policy version acting now; epsilon_min / _max: this actor's
    schedule_frames: where a decaying epsilon schedule stands (restarts included)
    episode_returns / episode_lengths: raw returns and lengths (steps) of the
        episodes finished since the last ``stats(reset_episodes=True)``
    time: seconds spent in env, inference, other, encode, push, throttle
    incarnation: the writer's (None before the first connection); restarted: Ray
        reran the constructor; seed_salt: mixed into the seeds after a restart
    """

    actor: int
    frames: int
    env_steps: int
    vector_steps: int
    transitions_pushed: int
    transitions_dropped: int
    transitions_buffered: int
    buffered_bytes: int
    pushes: int
    pushes_duplicate: int
    pushes_failed: int
    replay_resets: int
    replay_ok: bool
    weight_version: int
    epsilon_min: float
    epsilon_max: float
    schedule_frames: int
    episode_returns: list[float]
    episode_lengths: list[int]
    time: dict[str, float]
    incarnation: int | None
    restarted: bool
    seed_salt: int
    inference_dtype: str


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
    subscriber: anything with ``poll() -> (version, weights) | None`` and
    ``version``, used instead of a `WeightSubscriber` on ``weight_store`` (an
    in-process run: `deploy.inprocess.LocalSubscriber`).
    torch_threads: torch's CPU threads for this process (the Ray actor: 1, its one
    CPU); None leaves them (in-process, next to the learner).

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
        subscriber: Any | None = None,
        torch_threads: int | None = 1,
    ):
        if torch_threads:
            torch.set_num_threads(torch_threads)
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
        self._n = {"vector_steps": 0}
        # seconds: env stepping, forward passes, other (stacks, n-step, epsilon);
        # the outbox adds encode (batch assembly), push (compression + msgpack +
        # the round trip) and throttle (waiting for the insert budget)
        self._time = {"env": 0.0, "inference": 0.0, "other": 0.0}
        self._outbox = ReplayOutbox(
            replay_url,
            cfg.replay.codec,
            int(a.local_buffer_mb * 2**20),
            actor_index,
            refs=self._held_ids,
        )
        self._outbox.connect()
        # Seeds: (run seed, actor index, restart salt). Ray exposes no restart count,
        # so a restarted actor salts with its writer incarnation (unique per start).
        salt = 0
        if self.restarted:
            salt = self._outbox.incarnation or int(time.time_ns() % 2**31)
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
            self.num_actions,
            cfg.learner.dueling,
            self.num_envs,
            inference_dtype,
            network=cfg.network(),
        )
        self._rng = np.random.default_rng(int(act_seed))
        self.exploration = Exploration(a, actor_index, self.num_actors)
        self._nstep = NStepAccumulator(self.num_envs, a.n_step, a.gamma)
        self._stacker = FrameStacker(self.num_envs)
        self._weight_store = weight_store
        if subscriber is None and weight_store is not None:
            subscriber = WeightSubscriber(weight_store)
        self._subscriber = subscriber
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
    ) -> ActorStats:
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
                self._push()
            if self._subscriber is not None and (
                steps % a.weight_poll_steps == 0 or steps % a.push_every == 0
            ):
                self._poll_weights()  # non-blocking; after each push too, as pushes may wait
        if self._pending is not None and len(self._pending):
            t0 = time.perf_counter()
            self._queue(self._pending.complete(self._infer()))
            self._time["inference"] += time.perf_counter() - t0
        self._pending = None
        self._outbox.seal(self.policy_version)
        self._outbox.drain(DRAIN_S)  # what this run produced, stored unless Redis fails
        return self.stats(reset_episodes=False)

    def stop(self) -> None:
        """Make ``run`` return after its current step (thread-safe)."""
        self._stop.set()

    def stats(self, reset_episodes: bool = True) -> ActorStats:
        """Counters since start; episodes (raw returns, lengths in steps) since the last call."""
        box = self._outbox.stats()
        with self._lock:
            episodes = list(self._episodes)
            if reset_episodes:
                self._episodes.clear()
            env_steps = self._n["vector_steps"] * self.num_envs
            return ActorStats(
                actor=self.index,
                frames=self.frame_skip * env_steps,
                env_steps=env_steps,
                vector_steps=self._n["vector_steps"],
                transitions_pushed=box.pushed,
                transitions_dropped=box.dropped,
                transitions_buffered=box.buffered,
                buffered_bytes=box.buffered_bytes,
                pushes=box.pushes,
                pushes_duplicate=box.duplicates,
                pushes_failed=box.push_failed,
                replay_resets=box.resets,
                replay_ok=box.replay_ok,
                weight_version=self.policy_version,
                epsilon_min=float(np.min(self._eps)),
                epsilon_max=float(np.max(self._eps)),
                schedule_frames=self._schedule_offset + self.frame_skip * env_steps,
                episode_returns=[r for r, _ in episodes],
                episode_lengths=[n_ for _, n_ in episodes],
                time={**self._time, **self._outbox.time},
                incarnation=box.incarnation,
                restarted=self.restarted,
                seed_salt=self.seed_salt,
                inference_dtype=self._policy.dtype,
            )

    def schedule_frames(self) -> int:
        """Where the exploration schedule stands: frames of earlier incarnations
        and resumed runs (``run(schedule_frames=...)``) plus this incarnation's."""
        return self._schedule_offset + self._own_frames()

    def _own_frames(self) -> int:
        return self.frame_skip * self._n["vector_steps"] * self.num_envs

    def current_stacks(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the stacks the network sees next: uint8[E, 4, 84, 84] and their
        frame ids int64[E, 4] (local counters until the first replay connection)."""
        return self._stacker.obs.copy(), self._stacker.ids | self._outbox.base()

    def epsilons(self) -> list[float]:
        """This actor's current per-env exploration rates."""
        return [float(e) for e in self._eps]

    def pid(self) -> int:
        import os

        return os.getpid()

    def close(self) -> None:
        self._env.close()
        self._outbox.close(timeout=DRAIN_S)

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
        self._outbox.add_frames(counters, frames)
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
            if self._weight_store is None:  # a local subscriber: nothing to resubscribe to
                raise
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
        self._outbox.add(batch)

    def _held_ids(self) -> list[np.ndarray]:
        """Frame ids (local counters) a future transition may still refer to."""
        refs = [self._stacker.ids, self._nstep.held_ids()]
        if self._pending is not None:
            refs.append(self._pending.obs_ids)
        return refs

    def _push(self) -> None:
        self._outbox.seal(self.policy_version)
        poll = self._poll_weights if self._subscriber is not None else None
        self._outbox.throttle(self._stop, poll)
