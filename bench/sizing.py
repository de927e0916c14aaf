"""Cluster sizing from measured figures: what N actors x E envs ask of the replay
shards, Redis, the network and the learner (docs/sizing.md works an example).

Reads the JSON that the benches printed (saved under bench/results/):

* ``--actor``  (`bench/actor.py`): ``actor_env_steps_per_s``, env steps (=
  transitions) per second of one actor on one core, at ``envs`` envs.
* ``--replay`` (`bench/replay.py`): ``bytes_per_transition`` (Redis memory per
  stored transition), ``frames_per_transition`` and ``codecs[codec].bytes_per_frame``
  (what one transition puts on the wire), ``insert_transitions_per_s`` (one shard
  ingesting from writer processes, all on ``cpus`` cores),
  ``cpu_ms_per_batch.loader_1_procs`` (CPU ms per sampled batch of 512: the
  redis-server, the loader process, the drawing process),
  ``distinct_frames_per_batch`` (frames one batch of 512 fetches),
  ``memory_2m_shard_process_GB_estimated`` (the shard process's index).
* ``--learner`` (`bench/learner.py`): ``updates_per_s_fed`` at ``batch_size``,
  the learner fed from a real replay (``--learner ''`` for none).

``--actor-steps-per-s``, ``--learner-batches-per-s`` and ``--redis-ms-per-batch``
replace the actor's, the learner's and Redis's figure by a given one (another CPU,
a GPU learner, a paper's figures, a bigger replay).

and prints a readable table, then the same as one JSON object (``--json``: the JSON
only). Every figure is a rate or size from those files scaled by the plan; the
JSON's ``inputs`` names the file and key each came from. The model, stated:

* transitions inserted/s I = actors x per-actor env steps/s (an actor is one core;
  the per-actor figure is used for any E, measured at the bench's E);
  env frames/s = I x frame skip; transitions sampled/s T = I x samples per insert;
  learner batches/s = T / batch size.
* a shard's redis-server is one core. Its busy fraction: I_shard /
  insert_transitions_per_s + T_shard / (512 x 1000 / redis ms per batch). The
  insert term is conservative: the bench's insert rate is the whole insert path
  (writers, the shard's ingest, Redis) on ``cpus`` cores. Shards = the smallest
  count that keeps every redis-server below ``--redis-busy`` (default 0.5: room
  for AOF rewrites, snapshots and bursts). Each shard also runs one shard actor
  (ingest, sum tree): 2 cores per shard.
* Redis memory = capacity x bytes per transition (as the bench measured it, at
  its ``stored_transitions``); the shard processes' index adds its own bytes per
  transition.
* network: actors -> Redis I x (frames per transition x bytes per frame + the
  80-byte record); Redis -> learner T / 512 x (distinct frames per batch x bytes
  per frame + 512 records); weights: every actor node fetches each published
  version once (Ray's object store), at most one per ``--publish-seconds``; the
  learner's node sends at most that to every actor node.
* loader cores next to the learner: T / 512 x loader ms per batch / 1000.
* one learner's transitions/s L (the learner figure): learners needed = T / L;
  actors one learner keeps busy = L / (samples per insert x per-actor rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DEFAULT_ACTOR = RESULTS / "2026-12-07-cpu2-actor-16envs.json"
DEFAULT_REPLAY = RESULTS / "2026-12-07-cpu2-replay-20k-after.json"
DEFAULT_LEARNER = RESULTS / "2026-12-07-cpu2-learner-fed.json"

REPLAY_BENCH_BATCH = 512  # bench/replay.py --batch: its per-batch figures are per 512
RECORD_BYTES = 80  # replay_server.records.RECORD_DTYPE.itemsize: 8 frame ids, action, return, ...
MB = 1e6
GB = 1e9


def nature_dueling_params(num_actions: int) -> int:
    """Parameters of the default `common.network.QNetwork` (Nature torso, dueling
    heads of 512 units) for ``num_actions`` actions."""
    conv = (4 * 32 * 8 * 8 + 32) + (32 * 64 * 4 * 4 + 64) + (64 * 64 * 3 * 3 + 64)
    features, hidden = 64 * 7 * 7, 512
    value = features * hidden + hidden + hidden + 1
    advantage = features * hidden + hidden + hidden * num_actions + num_actions
    return conv + value + advantage


@dataclass
class Plan:
    """The cluster being sized (the flags of this script)."""

    actors: int
    envs: int = 16
    samples_per_insert: float = 8.0
    batch_size: int = 512
    capacity: int = 2_000_000
    cpus_per_node: int = 16
    redis_busy: float = 0.5
    frame_skip: int = 4
    publish_seconds: float = 1.0
    weight_bytes: int = 4 * nature_dueling_params(18)  # float32, all 18 Atari actions
    actor_steps_per_s: float | None = None  # overrides the actor bench's figure
    learner_batches_per_s: float | None = None  # overrides the learner bench's figure
    redis_ms_per_batch: float | None = None  # overrides the replay bench's Redis CPU per batch
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in ("actors", "envs", "batch_size", "capacity", "cpus_per_node", "frame_skip"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("samples_per_insert", "publish_seconds", "weight_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0")
        if not 0 < self.redis_busy <= 1:
            raise ValueError("--redis-busy must be in (0, 1]: the share of one core")
        for name in ("actor_steps_per_s", "learner_batches_per_s", "redis_ms_per_batch"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be above 0")


def _get(data: dict, path: str, source: str) -> Any:
    """``data[a][b]...`` for ``path`` = ``"a.b"``, or a ValueError naming the file."""
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ValueError(
                f"{source}: no '{path}'; give the JSON that the bench prints (see --help)"
            )
        value = value[key]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise ValueError(f"{source}: '{path}' = {value!r} must be a number above 0")


def size(
    plan: Plan,
    actor: dict | None,
    replay: dict,
    learner: dict | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The sizing of ``plan`` from the bench outputs (parsed JSON). ``actor`` may be
    None when ``plan.actor_steps_per_s`` is given. Returns a JSON-ready dict."""
    plan.check()
    src = {"actor": "actor JSON", "replay": "replay JSON", "learner": "learner JSON"}
    src.update(sources or {})
    inputs: dict[str, Any] = {}

    def take(kind: str, data: dict, path: str) -> float:
        value = _get(data, path, src[kind])
        inputs[f"{kind}:{path}"] = {"value": value, "file": src[kind]}
        return value

    if plan.actor_steps_per_s is not None:
        per_actor = plan.actor_steps_per_s
        inputs["actor_steps_per_s"] = {"value": per_actor, "file": "--actor-steps-per-s"}
    elif actor is not None:
        per_actor = take("actor", actor, "actor_env_steps_per_s")
        bench_envs = take("actor", actor, "envs")
        if bench_envs != plan.envs:
            plan.notes.append(
                f"the per-actor rate was measured at {bench_envs:g} envs per actor, the plan "
                f"has {plan.envs}: measure bench/actor.py --envs {plan.envs} for this E"
            )
    else:
        raise ValueError("no actor figure: give --actor FILE or --actor-steps-per-s")

    codec = replay.get("codec", "lz4")
    bytes_per_transition = take("replay", replay, "bytes_per_transition")
    frames_per_transition = take("replay", replay, "frames_per_transition")
    bytes_per_frame = take("replay", replay, f"codecs.{codec}.bytes_per_frame")
    insert_cap = take("replay", replay, "insert_transitions_per_s")
    if plan.redis_ms_per_batch is not None:
        redis_ms = plan.redis_ms_per_batch
        inputs["redis_ms_per_batch"] = {"value": redis_ms, "file": "--redis-ms-per-batch"}
    else:
        redis_ms = take("replay", replay, "cpu_ms_per_batch.loader_1_procs.redis")
    loader_ms = take("replay", replay, "cpu_ms_per_batch.loader_1_procs.loaders")
    draw_ms = take("replay", replay, "cpu_ms_per_batch.loader_1_procs.this_process")
    distinct_frames = take("replay", replay, "distinct_frames_per_batch")
    index_gb_2m = take("replay", replay, "memory_2m_shard_process_GB_estimated")
    index_bytes = index_gb_2m * GB / 2_000_000

    # rates
    inserts = plan.actors * per_actor
    samples = inserts * plan.samples_per_insert
    batches = samples / plan.batch_size
    ref_batches = samples / REPLAY_BENCH_BATCH  # the bench's per-batch costs are per 512

    # shards: redis-server busy fraction, all shards together in "cores"
    sample_cap = REPLAY_BENCH_BATCH * 1000.0 / redis_ms
    redis_cores = inserts / insert_cap + samples / sample_cap
    shards = max(1, math.ceil(redis_cores / plan.redis_busy - 1e-9))
    per_shard_busy = redis_cores / shards

    # memory
    redis_bytes = plan.capacity * bytes_per_transition
    index_total = plan.capacity * index_bytes

    # network
    wire_per_transition = frames_per_transition * bytes_per_frame + RECORD_BYTES
    per_batch_fetch = distinct_frames * bytes_per_frame + REPLAY_BENCH_BATCH * RECORD_BYTES
    actor_nodes = math.ceil(plan.actors / plan.cpus_per_node)
    weights_per_node = plan.weight_bytes / plan.publish_seconds

    result: dict[str, Any] = {
        "plan": {k: v for k, v in asdict(plan).items() if k != "notes"},
        "rates": {
            "actor_env_steps_per_s": round(per_actor, 1),
            "env_steps_per_s": round(inserts, 1),
            "env_frames_per_s": round(inserts * plan.frame_skip, 1),
            "inserted_transitions_per_s": round(inserts, 1),
            "sampled_transitions_per_s": round(samples, 1),
            "learner_batches_per_s": round(batches, 2),
        },
        "replay": {
            "shards": shards,
            "redis_busy_per_shard": round(per_shard_busy, 3),
            "redis_cores_all_shards": round(redis_cores, 3),
            "shard_insert_limit_per_s": round(insert_cap, 1),
            "shard_sample_limit_per_s": round(sample_cap, 1),
            "cores": 2 * shards,
            "redis_memory_GB": round(redis_bytes / GB, 3),
            "redis_memory_GB_per_shard": round(redis_bytes / GB / shards, 3),
            "index_memory_GB": round(index_total / GB, 3),
        },
        "learner_node": {
            "loader_cores": round(ref_batches * loader_ms / 1000.0, 2),
            "draw_cores": round(ref_batches * draw_ms / 1000.0, 2),
            "learner_batches_per_s_needed": round(batches, 2),
        },
        "network_MBps": {
            "actors_to_redis": round(inserts * wire_per_transition / MB, 2),
            "redis_to_learner": round(ref_batches * per_batch_fetch / MB, 2),
            "weights_into_each_actor_node": round(weights_per_node / MB, 2),
            "weights_out_of_learner_node_max": round(actor_nodes * weights_per_node / MB, 2),
        },
        "actor_nodes": actor_nodes,
        "inputs": inputs,
        "notes": plan.notes,
    }
    capacity, on = None, ""
    if plan.learner_batches_per_s is not None:
        capacity = plan.learner_batches_per_s * plan.batch_size
        inputs["learner_batches_per_s"] = {
            "value": plan.learner_batches_per_s,
            "file": "--learner-batches-per-s",
        }
        on = f"{plan.learner_batches_per_s:g} batches/s of {plan.batch_size} (given)"
    elif learner is not None:
        fed = take("learner", learner, "updates_per_s_fed")
        fed_batch = take("learner", learner, "batch_size")
        capacity = fed * fed_batch
        device = learner.get("device_name", learner.get("device", "?"))
        on = f"{fed:g} batches/s of {fed_batch:g} measured on {device}"
    if capacity is not None:
        result["learner_node"].update(
            {
                "learner_transitions_per_s": round(capacity, 1),
                "learner_figure": on,
                "learners_needed": round(samples / capacity, 2),
                "actors_one_learner_keeps_busy": round(
                    capacity / (plan.samples_per_insert * per_actor), 1
                ),
            }
        )
    return result


ROWS = [
    ("rates", "env_frames_per_s", "env frames/s", "actors x per-actor env steps/s x frame skip"),
    ("rates", "inserted_transitions_per_s", "inserts/s", "one transition per env step"),
    ("rates", "sampled_transitions_per_s", "sampled transitions/s", "inserts x samples per insert"),
    ("rates", "learner_batches_per_s", "learner batches/s", "sampled / batch size"),
    ("replay", "shards", "replay shards", "keeps each redis-server below --redis-busy"),
    ("replay", "redis_busy_per_shard", "redis-server busy, each", "share of its one core"),
    ("replay", "cores", "replay cores", "redis-server + shard actor per shard"),
    ("replay", "redis_memory_GB", "Redis memory (GB), all", "capacity x bytes per transition"),
    ("replay", "redis_memory_GB_per_shard", "Redis memory (GB), each", "split evenly"),
    ("replay", "index_memory_GB", "shard index memory (GB), all", "in the shard actors"),
    ("learner_node", "loader_cores", "loader cores", "fetch + decode next to the learner"),
    ("learner_node", "draw_cores", "draw cores", "prioritized draws, the driver"),
    ("network_MBps", "actors_to_redis", "actors -> Redis MB/s", "compressed frames + records"),
    ("network_MBps", "redis_to_learner", "Redis -> learner MB/s", "a batch's distinct frames"),
    (
        "network_MBps",
        "weights_into_each_actor_node",
        "weights -> each node MB/s",
        "a version per --publish-seconds",
    ),
    (
        "network_MBps",
        "weights_out_of_learner_node_max",
        "weights out of learner MB/s",
        "x actor nodes, at most",
    ),
]


def table(result: dict[str, Any]) -> str:
    p = result["plan"]
    lines = [
        f"{p['actors']} actors x {p['envs']} envs, samples per insert {p['samples_per_insert']:g}, "
        f"batch {p['batch_size']}, capacity {p['capacity']:,}, {result['actor_nodes']} actor "
        f"node(s) of {p['cpus_per_node']} CPUs",
        "",
        f"{'quantity':<30} {'value':>12}  how",
    ]
    for section, key, label, how in ROWS:
        value = result[section][key]
        if isinstance(value, int):
            shown = f"{value:,}"
        else:
            shown = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:,.2f}"
        lines.append(f"{label:<30} {shown:>12}  {how}")
    ln = result["learner_node"]
    if "learner_transitions_per_s" in ln:
        lines += [
            f"{'one learner, transitions/s':<30} {ln['learner_transitions_per_s']:>12,.1f}  "
            f"{ln['learner_figure']}",
            f"{'learners needed':<30} {ln['learners_needed']:>12,.2f}  sampled / one learner's",
            f"{'actors one learner keeps busy':<30} {ln['actors_one_learner_keeps_busy']:>12,.1f}"
            "  one learner's / (samples per insert x per-actor rate)",
        ]
    r = result["replay"]
    lines += [
        "",
        f"one shard sustains {r['shard_insert_limit_per_s']:,.0f} inserts/s (whole insert path, "
        f"measured) and {r['shard_sample_limit_per_s']:,.0f} sampled transitions/s (its "
        "redis-server core alone)",
    ]
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def _load(path: str | Path, what: str) -> dict:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read the {what} JSON {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p} is not JSON ({exc}); give the object the bench printed") from None
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected one JSON object, as the bench prints")
    return data


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench/sizing.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example (Ape-X's Atari setup, docs/sizing.md): python bench/sizing.py "
        "--actors 360 --samples-per-insert 0.78 --batch-size 512 --capacity 2000000",
    )
    ap.add_argument("--actors", type=int, required=True, help="actor processes (N)")
    ap.add_argument("--envs", type=int, default=16, help="envs per actor (E), default 16")
    ap.add_argument(
        "--samples-per-insert",
        type=float,
        default=8.0,
        help="replay ratio: transitions sampled per transition inserted (default 8)",
    )
    ap.add_argument("--batch-size", type=int, default=512, help="learner batch (default 512)")
    ap.add_argument("--capacity", type=int, default=2_000_000, help="replay capacity")
    ap.add_argument("--cpus-per-node", type=int, default=16, help="CPUs of an actor node")
    ap.add_argument(
        "--redis-busy",
        type=float,
        default=0.5,
        help="largest share of its core a redis-server may be busy (default 0.5)",
    )
    ap.add_argument("--frame-skip", type=int, default=4, help="env frames per env step")
    ap.add_argument("--publish-seconds", type=float, default=1.0, help="as in train")
    ap.add_argument(
        "--weight-mb",
        type=float,
        default=None,
        help="MB of one weight version (default: the Nature dueling network, 18 actions, "
        "float32: 13.2)",
    )
    ap.add_argument(
        "--actor-steps-per-s",
        type=float,
        default=None,
        help="env steps/s of one actor, instead of the actor JSON's (e.g. another CPU)",
    )
    ap.add_argument(
        "--learner-batches-per-s",
        type=float,
        default=None,
        help="batches/s (of --batch-size) one learner trains, instead of the learner JSON's "
        "(Ape-X's paper: 19 of 512)",
    )
    ap.add_argument(
        "--redis-ms-per-batch",
        type=float,
        default=None,
        help="redis-server CPU ms per sampled batch of 512, instead of the replay JSON's "
        "(docs/benchmarks.md: 7.3 with 2M transitions stored)",
    )
    ap.add_argument("--actor", default=str(DEFAULT_ACTOR), help="bench/actor.py JSON")
    ap.add_argument("--replay", default=str(DEFAULT_REPLAY), help="bench/replay.py JSON")
    ap.add_argument(
        "--learner",
        default=str(DEFAULT_LEARNER),
        help="bench/learner.py JSON ('' for none)",
    )
    ap.add_argument("--json", action="store_true", help="print only the JSON object")
    args = ap.parse_args(argv)
    plan = Plan(
        actors=args.actors,
        envs=args.envs,
        samples_per_insert=args.samples_per_insert,
        batch_size=args.batch_size,
        capacity=args.capacity,
        cpus_per_node=args.cpus_per_node,
        redis_busy=args.redis_busy,
        frame_skip=args.frame_skip,
        publish_seconds=args.publish_seconds,
        actor_steps_per_s=args.actor_steps_per_s,
        learner_batches_per_s=args.learner_batches_per_s,
        redis_ms_per_batch=args.redis_ms_per_batch,
    )
    if args.weight_mb is not None:
        plan.weight_bytes = int(args.weight_mb * MB)
    try:
        actor = None if args.actor_steps_per_s is not None else _load(args.actor, "actor")
        replay = _load(args.replay, "replay")
        use_learner = args.learner and args.learner_batches_per_s is None
        learner = _load(args.learner, "learner") if use_learner else None
        sources = {"actor": _rel(args.actor), "replay": _rel(args.replay)}
        if use_learner:
            sources["learner"] = _rel(args.learner)
        result = size(plan, actor, replay, learner, sources)
    except ValueError as exc:
        print(f"bench/sizing.py: error: {exc}", file=sys.stderr)
        return 2
    if not args.json:
        print(table(result))
        print()
    print(json.dumps(result, indent=None if args.json else 1))
    return 0


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(p)


if __name__ == "__main__":
    sys.exit(main())
