"""The driver behind ``apex-dqn train``: brings every role up, trains, tears down.

`train(cfg)` steps:
  1. resolve the game (unknown ids fail here, before anything starts), read the
     action count, load and check the resume checkpoint, pick the logdir;
  2. Redis: check the ``--redis-url`` shard(s), or start one embedded
     redis-server per shard with its data under LOGDIR/redis, supervised by
     `RedisSupervisor` (a server that dies is restarted on its AOF);
  3. the replay namespaces: each shard's Redis must hold nothing, or a replay
     this run can continue (same game, codec, n-step, gamma, capacity); anything
     else stops the run here (exit 2) naming ``--replay-reset``, which deletes it;
  4. Ray: connect to ``--ray-address`` or start a local Ray (not with
     ``--in-process``, which runs the same roles in threads of this process:
     `deploy.inprocess`);
  5. `_run`: the named Ray actors (weights store, replay shards, env actors;
     `deploy.fleet`; and ``apex-eval`` unless --eval-every-minutes is 0,
     `deploy.evaluation`) and the learner's `TrainLoop` in this process (the
     driver takes the GPU when its node has one), fed by loader processes through
     `replay_server.loader.DataSource`; the replay ratio's one owner
     (`replay_server.rate_limiter.ReplayRatioKeeper`) paces both sides;
     `deploy.monitor.RunMonitor` polls the roles for the loop;
  6. on the time/frame/update limit, Ctrl-C, SIGTERM, or a role that cannot run:
     stop the actors, write the final checkpoint, score the final weights on
     ``apex-eval`` (not after SIGTERM, whose sender waits only a grace period, nor
     when a role failed; a second Ctrl-C skips it), let the shards ingest what was
     pushed, write the summary JSON (with what every fault cost, see
     `deploy.monitor.RunMonitor.summary`), stop the shards (they snapshot their
     index), shut down local Ray and the embedded redis-server(s).

Why one ~580-line module: it is the one place where a run is put together and
taken apart, in order (logdir lock, Redis, leases and namespaces, Ray, roles,
teardown); the roles themselves, the monitor (`deploy.monitor`) and the
in-process wiring (`deploy.inprocess`) live elsewhere.

Faults during the run are the roles' own business (see docs/failures.md):
actors buffer while the replay is unavailable, shards wait and
reconcile, the sampler waits, Ray restarts dead actors and shards, the
supervisor restarts dead embedded redis-servers.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import Config
from common.env import UnknownEnvError, make_vector_env, resolve_env

log = logging.getLogger("apex.launcher")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Redis memory per stored transition, by codec, for the embedded server's
# maxmemory: the 80-byte record, ~70 B of key overhead per frame, and a frame
# (about one new frame per transition) compressed at most this large on the
# Atari games measured (MsPacman lz4 ~1.8 KB; incompressible: 7,058 B).
FRAME_BYTES_BOUND = {"none": 7_100, "lz4": 3_000, "zstd": 2_500, "zstd-dict": 2_000}
MAXMEMORY_HEADROOM = 1.5
MAXMEMORY_RAM_SHARE = 0.75


class LaunchError(RuntimeError):
    """User-facing start-up failure: the message says what is wrong and what to do."""


class RunError(RuntimeError):
    """The run could not go on (a role cannot start or keeps failing, or training
    diverged); the message says why. The last good checkpoint is kept."""


def train(cfg: Config, out: Callable[[str], None] = print) -> dict:
    """Run a whole training job; returns the summary dict (also --summary-json)."""
    cfg.validate()
    from learner.tracking import require as require_tracking

    require_tracking(cfg)  # --track wandb without wandb: stop before anything starts
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
    resume_state = _load_resume(cfg, spec.env_id, num_actions)
    logdir.mkdir(parents=True, exist_ok=True)
    from common.locks import DirLock, InUse

    lock = DirLock(str(logdir), "the logdir")
    try:
        lock.acquire()  # one run per logdir: held until train() returns
    except InUse as exc:
        raise LaunchError(str(exc)) from None
    try:
        return _train(cfg, spec, num_actions, resume_state, logdir, out)
    finally:
        lock.release()


def _train(
    cfg: Config,
    spec: Any,
    num_actions: int,
    resume_state: dict | None,
    logdir: Path,
    out: Callable[[str], None],
) -> dict:
    """`train` once its logdir is locked: Redis, Ray, the roles, the summary."""
    cfg.run.logdir = str(logdir)
    (logdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    out(
        f"[apex] {spec.env_id} ({num_actions} actions, sticky {spec.sticky}), "
        f"{cfg.actor.actors} actors x {cfg.actor.envs_per_actor} envs, logdir {logdir}"
    )
    from actors.exploration import single_env_warning

    if warning := single_env_warning(cfg.actor, cfg.actor.actors):
        out(f"[apex] warning: {warning}")
    from learner import tracking
    from replay_server import lease
    from replay_server.endpoints import endpoints
    from replay_server.namespace import ReplayIdentity

    identity = ReplayIdentity(
        env_id=spec.env_id,
        num_actions=num_actions,
        codec=cfg.replay.codec,
        n_step=cfg.actor.n_step,
        gamma=cfg.actor.gamma,
    )
    _check_redis_urls(cfg)
    stop = threading.Event()
    with ExitStack() as stack:
        # first in, last out: the W&B run (--track) patches TensorBoard before _run's
        # Metrics opens its writer, and ends after every role has stopped
        tracker = stack.enter_context(tracking.start(cfg, logdir, out))
        backend = stack.enter_context(_redis(cfg, logdir, out))
        eps = endpoints(backend.urls)  # the run's shard endpoints, built once
        owner = lease.Owner.this_run(str(logdir))
        stack.callback(_release_leases, eps, owner)
        _check_namespaces(cfg, eps, identity, owner, out)
        if not cfg.run.in_process:
            stack.enter_context(_ray(cfg, out))
        stack.enter_context(_signals(stop, out))
        summary = _run(cfg, backend, eps, owner, identity, resume_state, logdir, stop, out)
        tracker.finish(summary)
    if cfg.run.summary_json:
        Path(cfg.run.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.run.summary_json).write_text(json.dumps(summary, indent=2))
    out(f"[apex] done: {json.dumps(summary)}")
    if summary.get("error"):
        raise RunError(summary["error"])
    return summary


def _load_resume(cfg: Config, env_id: str, num_actions: int) -> dict | None:
    if not cfg.run.resume:
        return None
    from learner.checkpoint import CheckpointError, load_resume

    try:
        return load_resume(cfg, env_id, num_actions)
    except CheckpointError as exc:
        raise LaunchError(str(exc)) from None


def _check_redis_urls(cfg: Config) -> None:
    """Fail fast, before anything starts, on a --redis-url nobody answers at. (Once
    the run is going, an unavailable Redis is waited for, not fatal.)"""
    from replay_server.redis_proc import ReplayUnavailable, connect

    for url in cfg.redis_urls():
        try:
            connect(url).close()
        except ReplayUnavailable as exc:
            raise LaunchError(str(exc)) from None


def capacity_per_shard(cfg: Config) -> int:
    return max(1, cfg.replay.capacity // cfg.num_shards())


def embedded_maxmemory(cfg: Config, total_ram: int | None = None) -> int:
    """maxmemory (bytes) of each embedded redis-server: the replay's worst case
    with headroom, at most a share of this machine's memory (then a full replay
    is an ``OOM`` the roles wait out, not the kernel's OOM killer)."""
    per_transition = 80 + 70 + FRAME_BYTES_BOUND.get(cfg.replay.codec, 7_100)
    want = int(capacity_per_shard(cfg) * per_transition * MAXMEMORY_HEADROOM) + (64 << 20)
    if total_ram is None:
        try:
            total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total_ram = 0
    if total_ram:
        want = min(want, int(MAXMEMORY_RAM_SHARE * total_ram / cfg.num_shards()))
    return max(want, 64 << 20)


@dataclass
class ReplayBackend:
    """The shards' Redis: their URLs (secrets: never print them, see `redact`), and
    for embedded servers the processes and their supervisor."""

    urls: list[str]
    servers: list[Any] = field(default_factory=list)
    supervisor: Any = None

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts if self.supervisor is not None else 0


@contextmanager
def _redis(cfg: Config, logdir: Path, out: Callable[[str], None]) -> Iterator[ReplayBackend]:
    """The shards' Redis: --redis-url, or supervised embedded redis-servers.

    Embedded ones bind 127.0.0.1 with a random password. With --ray-address,
    actors may run on other nodes, so they bind this node's IP instead.
    """
    from replay_server.redis_proc import EmbeddedRedis, RedisSupervisor, redact

    urls = cfg.redis_urls()
    if urls:
        yield ReplayBackend(urls)
        return
    host = "127.0.0.1"
    if cfg.run.ray_address:
        import ray

        host = ray.util.get_node_ip_address()
    maxmemory = embedded_maxmemory(cfg)
    servers: list[Any] = []
    supervisor = None
    try:
        for k in range(cfg.replay.shards):
            data_dir = Path(cfg.replay.data_dir or logdir / "redis") / f"shard-{k}"
            try:
                servers.append(EmbeddedRedis(str(data_dir), host=host, maxmemory=maxmemory))
            except (ValueError, FileNotFoundError) as exc:
                raise LaunchError(str(exc)) from None
            except (TimeoutError, RuntimeError) as exc:  # did not load its AOF, or exited
                raise LaunchError(
                    f"the embedded replay of shard {k} ({data_dir}) did not start: {exc}"
                ) from None
        supervisor = RedisSupervisor(servers, log_fn=out)
        out(
            f"[apex] embedded {os.path.basename(servers[0].binary)}: "
            f"{', '.join(redact(s.url) for s in servers)} (maxmemory {maxmemory >> 20} MiB each, "
            "restarted on its AOF if it dies)"
        )
        yield ReplayBackend([s.url for s in servers], servers, supervisor)
    finally:
        if supervisor is not None:
            supervisor.stop()
        for s in servers:
            s.stop()


def _check_namespaces(
    cfg: Config, eps: list[Any], identity: Any, owner: Any, out: Callable[[str], None]
) -> None:
    """Take each replay's lease (`replay_server.lease`: refused while another run
    holds it), then refuse (or with --replay-reset, delete) a replay this run
    cannot continue."""
    from replay_server import lease
    from replay_server.keys import ReplayKeys
    from replay_server.namespace import inspect_namespace, namespace_refusal, reset_namespace
    from replay_server.protocol import ReplayUnavailable
    from replay_server.records import RECORD_DTYPE, RECORDS_PER_CHUNK
    from replay_server.redis_proc import redact

    for ep in eps:
        keys, shown = ReplayKeys(ep.namespace), ep.where
        try:
            client = ep.connect()
            try:
                try:
                    lease.acquire(client, keys, owner, shown)
                except lease.LeaseHeld as exc:
                    raise LaunchError(str(exc)) from None
                if cfg.replay.replay_reset:
                    n = reset_namespace(client, keys, shown)
                    lease.acquire(client, keys, owner, shown)  # the reset deleted it
                    if n:
                        out(f"[apex] --replay-reset: deleted the replay in {shown} ({n} keys)")
                    continue
                problems = inspect_namespace(
                    client,
                    keys,
                    identity,
                    capacity_per_shard(cfg),
                    RECORD_DTYPE.itemsize,
                    RECORDS_PER_CHUNK,
                    shown,
                )
            finally:
                client.close()
        except ReplayUnavailable as exc:
            raise LaunchError(str(exc)) from None
        if problems:
            raise LaunchError(namespace_refusal(redact(ep.url), problems, keys.namespace))


def _release_leases(eps: list[Any], owner: Any) -> None:
    """Give back this run's leases (the shards do when they stop; this covers a
    run that ended before its shards started). Never raises."""
    from replay_server import lease
    from replay_server.keys import ReplayKeys

    for ep in eps:
        try:
            client = ep.connect()
            try:
                lease.release(client, ReplayKeys(ep.namespace), owner.encode())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - the lease then ends by itself
            continue


@contextmanager
def _ray(cfg: Config, out: Callable[[str], None]) -> Iterator[None]:
    import ray

    if ray.is_initialized():  # an embedding program (or a test) brought its own Ray
        yield
        return
    address = cfg.run.ray_address or None
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "namespace": "apex-dqn"}
    evaluator = 1 if cfg.eval.eval_every_minutes > 0 else 0  # apex-eval's CPU
    if address is None:
        cpus = os.cpu_count() or 2
        kwargs["num_cpus"] = max(cpus, cfg.actor.actors + evaluator)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
        if cfg.actor.actors > cpus:
            out(f"[apex] warning: {cfg.actor.actors} actors on {cpus} CPUs; they will share cores")
    if address is not None:
        _check_reachable(address)
    # Files ray.init creates are private from their first byte: Ray 2.60 writes its
    # token file (~/.ray/auth_token) with the process umask, 0644 under the usual
    # 022, and restrict_token_file() below could only narrow it afterwards.
    umask = os.umask(0o077)
    try:
        # "local" always starts a new Ray: plain ray.init() would join a cluster
        # that `ray start` left running on this machine.
        ctx = ray.init(address=address or "local", **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(
            f"cannot reach Ray at {address!r}: {str(exc).splitlines()[0]}; "
            "start it with 'ray start --head' or omit --ray-address to use a local Ray"
        ) from None
    finally:
        os.umask(umask)
    try:
        url = getattr(ctx, "dashboard_url", None)
        if url:
            from deploy.dashboard import dashboard_lines, restrict_token_file

            restrict_token_file()
            # the token itself only to a terminal: never into a file, a pipe or a log
            for line in dashboard_lines(url, tty=out is print and sys.stdout.isatty()):
                out(line)
        cpus_total = ray.cluster_resources().get("CPU", 0)
        if address is not None and cpus_total < cfg.actor.actors + evaluator:
            out(
                f"[apex] warning: the cluster has {cpus_total:g} CPUs for {cfg.actor.actors} "
                f"actors{' + 1 evaluator' if evaluator else ''}; the rest wait for nodes "
                "(autoscaler)"
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
        stop.signum = signum  # type: ignore[attr-defined]  # _run: no final evaluation on SIGTERM
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
    backend: ReplayBackend,
    eps: list[Any],
    owner: Any,
    identity: Any,
    resume_state: dict | None,
    logdir: Path,
    stop: threading.Event,
    out: Callable[[str], None],
) -> dict:
    """Wire the roles together and train until told to stop. Returns the summary
    (with ``error`` set when a role could not go on)."""

    from deploy.monitor import RunMonitor
    from learner.learner import Learner
    from learner.loop import TrainLoop
    from learner.metrics import Metrics
    from replay_server.rate_limiter import InsertBudget, ReplayRatio, ReplayRatioKeeper
    from replay_server.sampler import ReplaySampler

    # Ray fleets, or the same classes in this process (--in-process, deploy.inprocess)
    local = cfg.run.in_process
    if local:
        from deploy.inprocess import InlineData, LocalActors, LocalReplay, LocalWeights

        out("[apex] in-process: actors, replay and learner in this process, without Ray")
    else:
        from common.weights import WeightPublisher
        from deploy.fleet import ActorFleet, ReplayFleet, start_weight_store
        from replay_server.loader import DataSource

    _learner_threads(cfg, out)
    if local:
        weights = LocalWeights()
        replay: Any = LocalReplay(cfg, eps, capacity_per_shard(cfg), identity, owner.encode())
    else:
        store = start_weight_store()
        replay = ReplayFleet(cfg, eps, capacity_per_shard(cfg), identity, owner.encode())
    learner = Learner(cfg, identity.num_actions, cfg.learner.device)
    out(f"[apex] learner: {learner.device}, {learner.dtype} ({learner.dtype_reason})")
    if resume_state is not None:
        learner.load_state_dict(resume_state)
    batch_size = cfg.batch_size(learner.device.type)
    ratio = ReplayRatio(cfg.replay.samples_per_insert, cfg.replay.min_replay)
    keeper = ReplayRatioKeeper(ratio, budget=InsertBudget(eps, ratio, batch_size)).start()
    sampler = ReplaySampler(replay.links, codec=cfg.replay.codec, ratio=keeper)
    if local:
        data: Any = InlineData(sampler, batch_size)
    else:
        data = DataSource(sampler, batch_size, cfg.replay.loader_workers, cfg.replay.prefetch)
    metrics = Metrics(str(logdir / "tb"), use_ray=not local)

    start_frames = int(((resume_state or {}).get("counters") or {}).get("frames", 0))
    if local:
        publish = weights.publish
        publish(0, learner.get_weights())  # actors start from the learner's weights
        actors: Any = LocalActors(cfg, eps, weights, start_frames=start_frames)
    else:
        publisher = WeightPublisher(store)
        publish = publisher.publish
        publish(0, learner.get_weights())
        publisher.wait()
        actors = ActorFleet(cfg, eps, start_frames=start_frames)
    monitor = RunMonitor(
        actors, replay, backend, data, stop, max_outage_s=60.0 * cfg.run.max_outage_minutes
    )
    evaluation = _evaluation(cfg, logdir, metrics, identity.num_actions, out)
    loop = TrainLoop(
        cfg,
        learner,
        sample=data.sample,
        update_priorities=data.update_priorities,
        publish=publish,
        poll_external=monitor.poll,
        metrics=metrics,
        checkpoint_path=str(logdir / "checkpoint.pt"),
        counters=(resume_state or {}).get("counters"),
        log=out,
        evaluation=evaluation,
    )
    ended = False
    try:
        summary = loop.run(stop)
        ended = True
    finally:
        actors.stop()
        data.close()
        if evaluation is not None:
            if getattr(stop, "signum", None) == signal.SIGTERM:
                # a supervisor's stop (docker compose stop, ray job stop, systemd)
                # comes with a short grace period: the checkpoint is written, go
                out("[apex] SIGTERM: no final evaluation (the checkpoint is written)")
            elif ended and monitor.error is None:
                _final_evaluation(loop, out)
            evaluation.close()  # takes one that has just finished; drops a running one
        replay.drain()
        monitor.final()
        replay.stop()
        metrics.close()
        keeper.close()
    summary.update(monitor.summary(), logdir=str(logdir))
    if evaluation is not None:
        summary.update(evaluation.summary())
        # one count of every file the run could not write (full disk): checkpoints,
        # best.pt, videos, evals.jsonl
        summary["checkpoint_failures"] += summary["eval_write_failures"]
    if monitor.error is not None:
        summary["error"] = str(monitor.error)
    return summary


FINAL_EVAL_TIMEOUT_S = 900.0  # 10 long episodes on one busy core fit; a hung actor does not


def _final_evaluation(loop: Any, out: Callable[[str], None]) -> None:
    """Score the final weights; a second Ctrl-C (KeyboardInterrupt) skips it."""
    try:
        loop.final_evaluation(FINAL_EVAL_TIMEOUT_S)
    except KeyboardInterrupt:
        out("[apex] final evaluation skipped (Ctrl-C)")


def _evaluation(
    cfg: Config, logdir: Path, metrics: Any, num_actions: int, out: Callable[[str], None]
) -> Any:
    """`PeriodicEvaluation` on the ``apex-eval`` actor (in a thread with
    ``--in-process``), or None when turned off."""
    if cfg.eval.eval_every_minutes <= 0:
        return None
    from learner.evaluator import Evaluator, PeriodicEvaluation, ThreadBackend

    where = "a thread" if cfg.run.in_process else "apex-eval"
    out(
        f"[apex] evaluation: {cfg.eval.eval_episodes} episodes every "
        f"{cfg.eval.eval_every_minutes:g} min on {where} -> {logdir / 'evals.jsonl'}"
    )
    if cfg.run.in_process:
        backend: Any = ThreadBackend(Evaluator(cfg, num_actions))
    else:
        from deploy.evaluation import RayEvalBackend

        backend = RayEvalBackend(cfg, num_actions)
    return PeriodicEvaluation(cfg, logdir, backend, metrics, cfg.env.env, num_actions, log=out)
