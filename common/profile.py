"""Hardware profiles: the settings a run starts from on the machine at hand.

``--profile auto|cpu|gpu`` (`RunConfig.profile`). ``auto`` takes ``gpu`` when the
learner's device is CUDA (``--device cuda``, or ``auto`` with a CUDA device
present) and ``cpu`` otherwise. A profile only fills the settings the user did not
give: every flag and every key of a ``--config`` file wins over it. The CLI
(`deploy.cli.config_from_args`) applies it once and records the resolved name in
``run.profile``, so ``config.json``, checkpoints and ``train --check`` show what
was chosen; ``--resume`` keeps the resumed run's values.

``gpu`` keeps the published Ape-X settings (Horgan et al. 2018): the Nature
torso, batch 512, a target copy every 2,500 updates, Double DQN, a replay ratio
of 8 (the learner is fast, so data decides), beta annealed over 1M updates.

``cpu`` is for a learner that shares a few cores with its actors, where the
learner's update rate decides how fast the agent learns (a GPU does 20x more).
Its values, and the measurements behind them, are listed in `_CPU` (why each
one) and in docs/configuration.md ("Hardware profiles"); `bench/learning.py`
measures time-to-score with them (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROFILES = ("auto", "cpu", "gpu")


@dataclass(frozen=True)
class Choice:
    """One setting a profile picks: ``section.name = value``, and why."""

    section: str
    name: str
    value: Any
    why: str


def resolve(profile: str, device: str, cuda_available: bool) -> tuple[str, str]:
    """``(cpu|gpu, reason)`` for ``--profile`` and the learner's ``--device``."""
    if profile in ("cpu", "gpu"):
        return profile, f"--profile {profile}"
    if profile != "auto":
        raise ValueError(f"profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if device.startswith("cuda"):
        return "gpu", f"auto: --device {device}"
    if device == "cpu":
        return "cpu", "auto: --device cpu"
    if cuda_available:
        return "gpu", "auto: a CUDA device is present"
    return "cpu", "auto: no CUDA device"


def choices(kind: str, cpus: int, actors: int | None = None, local: bool = True) -> list[Choice]:
    """The settings of profile ``kind`` (``cpu`` or ``gpu``) on a machine with
    ``cpus`` cores. On ``cpu`` with a local Ray (``local``) it also splits the cores:
    ``actors`` (given by the user, else one per core but one) and the learner's
    torch threads (the cores no actor takes). On a cluster (``--ray-address``) the
    actors are elsewhere: both are left to the flags and the launcher."""
    if kind == "gpu":
        return list(_GPU)
    if kind != "cpu":
        raise ValueError(f"profile kind {kind!r}; choose cpu or gpu")
    if not local:
        return list(_CPU)
    split = []
    if actors is None:
        actors = max(1, cpus - 1)
        split.append(
            Choice("actor", "actors", actors, f"{cpus} cores: one per actor, one for the learner")
        )
    split.append(
        Choice(
            "learner",
            "torch_threads",
            max(1, cpus - actors - 1),
            "the cores no actor takes (torch threads that outnumber free cores spin: "
            "10-30x slower updates)",
        )
    )
    return [*_CPU, *split]


_GPU = (
    Choice("learner", "network", "nature", "Ape-X's torso (Mnih et al. 2015)"),
    Choice("learner", "batch_size", 512, "Ape-X"),
    Choice("learner", "target_update", 2_500, "Ape-X"),
    Choice("learner", "double", True, "Ape-X (van Hasselt et al. 2016)"),
    Choice("replay", "samples_per_insert", 8.0, "Ape-X-like; a GPU learner waits for data"),
    Choice("replay", "min_replay", 20_000, "Ape-X-era warm-up"),
    Choice("replay", "beta_anneal_updates", 1_000_000, "about Ape-X's run length in updates"),
    Choice("replay", "loader_workers", 2, "batches of 512 need two decoders"),
    Choice("eval", "eval_every_minutes", 10.0, "a long run: an evaluation every 10 min"),
)

# Measured on 2 cores (AMD EPYC, AVX2, no bf16 units), torch 2.13 CPU; see
# docs/configuration.md ("Hardware profiles") and the A/B table of time-to-score
# runs in docs/benchmarks.md (bench/learning.py).
_CPU = (
    Choice(
        "learner",
        "network",
        "nature",
        "time-to-score decides, not updates/s: --network small made 2x the updates and "
        "tied at 30 minutes (docs/benchmarks.md), so the Nature torso stays",
    ),
    Choice(
        "learner",
        "batch_size",
        32,
        "an update's cost grows with the batch on a CPU: more, smaller updates learn faster",
    ),
    Choice(
        "learner",
        "target_update",
        500,
        "a copy every ~40 s at CPU update rates (~13/s), not every ~3 minutes",
    ),
    Choice(
        "learner",
        "double",
        False,
        "its extra forward pass cost 3-23% of a CPU update (bench/learner.py --steps); "
        "Pong learns without it",
    ),
    Choice(
        "replay",
        "samples_per_insert",
        2.0,
        "the learner is the bottleneck: fresher data instead of idle actors",
    ),
    Choice("replay", "min_replay", 10_000, "learning starts in seconds, not minutes"),
    Choice(
        "replay",
        "beta_anneal_updates",
        200_000,
        "a fixed length, stated: about four hours of CPU updates (~13/s on 2 cores), so "
        "beta moves 0.4 -> ~0.54 in the first hour instead of 0.4 -> 0.43",
    ),
    Choice("replay", "loader_workers", 1, "batches of 32 decode in a fraction of one core"),
    Choice(
        "eval",
        "eval_every_minutes",
        5.0,
        "the first greedy score within ~5 minutes (the evaluator is niced: it takes "
        "idle CPU first)",
    ),
)


def apply(cfg: Any, kind: str, explicit: set[str], cpus: int) -> list[Choice]:
    """Set each of profile ``kind``'s settings on ``cfg`` unless its field name is
    in ``explicit`` (given by a flag or a config file); records ``kind`` in
    ``cfg.run.profile``. Returns the choices applied. ``cpus``: this machine's
    cores (what a local Ray gets)."""
    applied = []
    actors = cfg.actor.actors if "actors" in explicit else None
    for c in choices(kind, cpus, actors=actors, local=not cfg.run.ray_address):
        if c.name in explicit:
            continue
        setattr(getattr(cfg, c.section), c.name, c.value)
        applied.append(c)
    cfg.run.profile = kind
    return applied


def describe(kind: str, reason: str, applied: list[Choice]) -> str:
    """One line for the console: the profile, why, and what it set."""
    values = ", ".join(f"{c.name.replace('_', '-')} {_fmt(c.value)}" for c in applied)
    return f"profile {kind} ({reason}): {values or 'every setting given explicitly'}"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and value.is_integer():
        return f"{value:g}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value:_}"
    return str(value)
