"""The driver behind ``apex-dqn train``: brings every role up, trains, tears down.

`train(cfg)` steps:
  1. resolve the game (unknown ids fail here, before anything starts), read the
     action count, pick the logdir, load and check the resume checkpoint;
  2. Ray: connect to ``--ray-address`` or start a local Ray;
  3. Redis: check the ``--redis-url`` shard(s) (before Ray starts), or start one
     embedded redis-server per shard with its data under LOGDIR/redis;
  4. start the named Ray actors (weights store, replay shards, env actors;
     see `deploy.fleet`);
  5. run the learner's `TrainLoop` in this process (the driver takes the GPU when
     its node has one), fed by a prefetching sampler over the replay shards;
  6. on the time/frame limit, Ctrl-C or SIGTERM: stop the actors, write the final
     checkpoint and the summary JSON, stop the shards (they snapshot their
     index), shut down local Ray and the embedded redis-server(s).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from common.config import Config
from common.env import UnknownEnvError, make_vector_env, resolve_env

log = logging.getLogger("apex.launcher")
REPO_ROOT = Path(__file__).resolve().parent.parent


class LaunchError(RuntimeError):
    """User-facing start-up failure: the message says what is wrong and what to do."""


def train(cfg: Config, out: Callable[[str], None] = print) -> dict:
    """Run a whole training job; returns the summary dict (also --summary-json)."""
    cfg.validate()
    try:
        spec = resolve_env(cfg.env.env, cfg.env)
    except UnknownEnvError as exc:
        raise LaunchError(str(exc)) from None
    cfg.env.env = spec.env_id
    probe = make_vector_env(cfg.env, 1, seed=cfg.run.seed)
    num_actions = probe.num_actions
    probe.close()

    logdir = Path(
        cfg.run.logdir or f"runs/{spec.game.replace('/', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    logdir.mkdir(parents=True, exist_ok=True)
    cfg.run.logdir = str(logdir)
    resume_state = _load_resume(cfg, spec.env_id, num_actions)
    (logdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    out(
        f"[apex] {spec.env_id} ({num_actions} actions, sticky {spec.sticky}), "
        f"{cfg.actor.actors} actors x {cfg.actor.envs_per_actor} envs, logdir {logdir}"
    )

    _check_redis_urls(cfg)
    stop = threading.Event()
    with ExitStack() as stack:
        stack.enter_context(_ray(cfg, out))
        urls = stack.enter_context(_redis(cfg, logdir, out))
        stack.enter_context(_signals(stop, out))
        summary = _run(cfg, urls, num_actions, resume_state, logdir, stop, out)
    if cfg.run.summary_json:
        Path(cfg.run.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.run.summary_json).write_text(json.dumps(summary, indent=2))
    out(f"[apex] done: {json.dumps(summary)}")
    return summary


def _load_resume(cfg: Config, env_id: str, num_actions: int) -> dict | None:
    if not cfg.run.resume:
        return None
    from learner.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(
            cfg.run.resume,
            expect_env=env_id,
            expect_actions=num_actions,
            expect_dueling=cfg.learner.dueling,
            expect_optimizer=cfg.learner.optimizer,
        )
    except CheckpointError as exc:
        raise LaunchError(str(exc)) from None


def _check_redis_urls(cfg: Config) -> None:
    """Fail fast, before Ray starts, on a --redis-url nobody answers at."""
    from replay_server.redis_proc import ReplayUnavailable, connect

    for url in cfg.redis_urls():
        try:
            connect(url).close()
        except ReplayUnavailable as exc:
            raise LaunchError(str(exc)) from None


@contextmanager
def _redis(cfg: Config, logdir: Path, out: Callable[[str], None]) -> Iterator[list[str]]:
    """The shard URLs: --redis-url, or embedded redis-servers for this run.

    On a local Ray they bind 127.0.0.1. With --ray-address, actors may run on
    other nodes, so they bind this node's IP and require a random password.
    """
    import secrets

    import ray

    from replay_server.redis_proc import EmbeddedRedis, redact

    urls = cfg.redis_urls()
    if urls:
        yield urls
        return
    host, password = "127.0.0.1", None
    if cfg.run.ray_address:
        host, password = ray.util.get_node_ip_address(), secrets.token_hex(16)
    servers: list[Any] = []
    try:
        for k in range(cfg.replay.shards):
            data_dir = Path(cfg.replay.data_dir or logdir / "redis") / f"shard-{k}"
            data_dir.mkdir(parents=True, exist_ok=True)
            servers.append(EmbeddedRedis(str(data_dir), password=password, host=host))
        out(f"[apex] embedded redis-server: {', '.join(redact(s.url) for s in servers)}")
        yield [s.url for s in servers]
    finally:
        for s in servers:
            s.stop()


@contextmanager
def _ray(cfg: Config, out: Callable[[str], None]) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # an embedding program (or a test) brought its own Ray
        yield
        return
    address = cfg.run.ray_address or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "namespace": "apex-dqn"}
    if address is None:
        cpus = os.cpu_count() or 2
        kwargs["num_cpus"] = max(cpus, cfg.actor.actors)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
        if cfg.actor.actors > cpus:
            out(f"[apex] warning: {cfg.actor.actors} actors on {cpus} CPUs; they will share cores")
    if address is not None:
        _check_reachable(address)
    try:
        # "local" always starts a new Ray: plain ray.init() would join a cluster
        # that `ray start` left running on this machine.
        ctx = ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(
            f"cannot reach Ray at {address!r}: {str(exc).splitlines()[0]}; "
            "start it with 'ray start --head' or omit --ray-address to use a local Ray"
        ) from None
    try:
        url = getattr(ctx, "dashboard_url", None)
        if url:
            from deploy.dashboard import dashboard_lines, restrict_token_file

            restrict_token_file()
            # the token itself only to a terminal: never into a file, a pipe or a log
            for line in dashboard_lines(url, tty=out is print and sys.stdout.isatty()):
                out(line)
        cpus_total = ray.cluster_resources().get("CPU", 0)
        if address is not None and cpus_total < cfg.actor.actors:
            out(
                f"[apex] warning: the cluster has {cpus_total:g} CPUs for {cfg.actor.actors} "
                "actors; the rest wait for nodes (autoscaler)"
            )
        yield
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail fast on a host:port nobody listens on (ray.init would retry for minutes)."""
    import socket

    target = address.removeprefix("ray://")
    if target == "auto" or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except (OSError, ValueError) as exc:
        raise LaunchError(
            f"cannot reach Ray at {address!r}: {exc}; start it with 'ray start --head' "
            "(its address is printed there) or omit --ray-address to use a local Ray"
        ) from None


@contextmanager
def _signals(stop: threading.Event, out: Callable[[str], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        out(f"[apex] {signal.Signals(signum).name}: stopping (again to force)")
        stop.set()

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _learner_threads(cfg: Config, out: Callable[[str], None]) -> None:
    """CPU learner next to local actors: leave the actors their cores.

    torch's OpenMP threads spin-wait; when they outnumber the free cores an update
    gets 10-30x slower (measured on 2 cores at batch 32, 2 vs 1 threads: 1.4 vs
    16.4 updates/s next to one busy process). So unless --torch-threads says otherwise, a
    CPU learner on a local Ray uses the cores that no actor takes.
    """
    import torch

    from learner.learner import resolve_device

    if cfg.learner.torch_threads > 0 or resolve_device(cfg.learner.device).type != "cpu":
        return
    if cfg.run.ray_address:  # actors are elsewhere (or we cannot tell): torch's default
        return
    threads = max(1, (os.cpu_count() or 2) - cfg.actor.actors - 1)
    torch.set_num_threads(threads)
    out(f"[apex] CPU learner: {threads} torch thread(s) (--torch-threads to change)")


def _run(
    cfg: Config,
    urls: list[str],
    num_actions: int,
    resume_state: dict | None,
    logdir: Path,
    stop: threading.Event,
    out: Callable[[str], None],
) -> dict:
    import ray

    from deploy.fleet import ActorFleet, start_shards, start_weight_store
    from learner.learner import Learner
    from learner.loop import TrainLoop
    from learner.metrics import Metrics
    from replay_server.remote import RemoteShard
    from replay_server.sampler import PrefetchLoader, ReplaySampler

    _learner_threads(cfg, out)
    capacity_per_shard = max(1, cfg.replay.capacity // len(urls))
    store = start_weight_store()
    shard_handles = start_shards(cfg, urls, capacity_per_shard)
    shards = [RemoteShard(h) for h in shard_handles]
    learner = Learner(cfg, num_actions, cfg.learner.device)
    if resume_state is not None:
        learner.load_state_dict(resume_state)
    batch_size = cfg.batch_size(learner.device.type)
    sampler = ReplaySampler(
        shards,
        urls,
        codec=cfg.replay.codec,
        min_size=cfg.replay.min_replay,
        samples_per_insert=cfg.replay.samples_per_insert,
    )
    beta = [cfg.replay.beta]
    loader = PrefetchLoader(
        lambda: sampler.sample(batch_size, beta[0]), cfg.replay.loader_workers, cfg.replay.prefetch
    )

    def sample(b: float) -> Any:
        beta[0] = b
        return loader.get(timeout=1.0)

    def publish(version: int, weights: dict) -> None:
        ray.get(store.publish.remote(version, [ray.put(weights)]))

    fleet: ActorFleet | None = None
    last: dict = {}

    budget = InsertBudget(cfg, urls, batch_size)

    def poll_external() -> dict:
        assert fleet is not None
        stats = fleet.poll(timeout=1.0)
        shard_stats = [s.stats() for s in shards]
        stats["replay_size"] = sum(s["size"] for s in shard_stats)
        stats["inserted"] = sum(s["inserted_total"] for s in shard_stats)
        stats["replay_bytes"] = sum(s.get("bytes_used", 0) for s in shard_stats)
        budget.update(sampler.stats()["sampled"])
        last.update(stats)
        return stats

    metrics = Metrics(str(logdir / "tb"), use_ray=True)
    publish(0, learner.get_weights())  # actors start from the learner's weights
    fleet = ActorFleet(
        cfg, urls, start_frames=int(((resume_state or {}).get("counters") or {}).get("frames", 0))
    )
    loop = TrainLoop(
        cfg,
        learner,
        sample=sample,
        update_priorities=sampler.update_priorities,
        publish=publish,
        poll_external=poll_external,
        metrics=metrics,
        checkpoint_path=str(logdir / "checkpoint.pt"),
        counters=(resume_state or {}).get("counters"),
        log=out,
    )
    try:
        summary = loop.run(stop)
        summary.update(
            replay_size=last.get("replay_size", 0),
            replay_inserted=last.get("inserted", 0),
            replay_bytes=last.get("replay_bytes", 0),
            actor_weight_versions=last.get("actor_weight_versions", []),
            actor_restarts=last.get("actor_restarts", 0),
            logdir=str(logdir),
        )
    finally:
        fleet.stop()
        loader.close()
        for h in shard_handles:
            try:
                ray.get(h.stop.remote(), timeout=30)
            except ray.exceptions.RayError as exc:
                out(f"[apex] warning: replay shard did not stop cleanly: {exc}")
        metrics.close()
        budget.close()
    return summary


class InsertBudget:
    """The insert side of ``--samples-per-insert`` (the sampler holds the other).

    Every poll, each shard's Redis gets ``budget = pushed_at_start +
    (min_replay + sampled / R + tolerance) / shards``; writers that pushed
    more wait (bounded) before their next push. Tolerance: 20 batches' worth of
    inserts, at least 1,000, so that actors run smoothly between polls.
    Off (key deleted) when R = 0.
    """

    def __init__(self, cfg: Config, urls: list[str], batch_size: int):
        from replay_server.keys import ReplayKeys
        from replay_server.redis_proc import connect

        self.keys = ReplayKeys()
        self.clients = [connect(u) for u in urls]
        self.ratio = cfg.replay.samples_per_insert
        self.min_replay = cfg.replay.min_replay
        self.tolerance = max(1000.0, 20 * batch_size / self.ratio) if self.ratio > 0 else 0.0
        self.base = [int(c.get(self.keys.pushed) or 0) for c in self.clients]
        self.update(0)

    def update(self, sampled: int) -> None:
        if self.ratio <= 0:
            for c in self.clients:
                c.delete(self.keys.budget)
            return
        # the sampler allows sampled <= R * (inserted - min_replay) + tol: mirror it
        total = self.min_replay + sampled / self.ratio + self.tolerance
        share = total / len(self.clients)
        for c, base in zip(self.clients, self.base, strict=True):
            c.set(self.keys.budget, int(base + share))

    def close(self) -> None:
        for c in self.clients:
            try:
                c.delete(self.keys.budget)
            except Exception:  # Redis already gone: nothing left to unblock
                pass
            c.close()
