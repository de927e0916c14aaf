"""Typed configuration: one dataclass per component, one `Config` holding them.

Every field has a default with a one-line reason (its ``help``). Flags and config
files map onto fields 1:1: the field ``envs_per_actor`` of section ``actor`` is
the flag ``--envs-per-actor`` and the key ``envs_per_actor`` under ``[actor]`` in
a TOML/YAML file. Field names are unique across sections so that each flag names
exactly one field. Nothing here is global state: build a `Config`, validate it,
pass it down.

Why one long module (~800 lines): each setting is declared once, here, with its
default, its help and (for a number) its allowed range (`Bound`); the flags of
``apex-dqn``, the config-file keys and every "bad config value" message are
generated from these declarations, so splitting them would mean stating a setting
in two places again.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from common.redact import REDACTED, redact_url, url_secrets

REDIS_URL_ENV = "APEX_REDIS_URL"


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says which."""


@dataclass(frozen=True)
class Bound:
    """The allowed values of one numeric field: a finite number in ``[lo, hi]``
    (``lo``/``hi`` excluded when ``lo_open``/``hi_open``), or one of ``special``
    (sentinels such as ``0 = auto``, value -> meaning). ``why``: the reason for
    the range, printed with the error."""

    lo: float
    hi: float
    why: str
    lo_open: bool = False
    hi_open: bool = False
    special: tuple[tuple[float, str], ...] = ()

    def allows(self, value: float) -> bool:
        if any(value == s for s, _ in self.special):
            return True
        if not _finite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def describe(self) -> str:
        lo, hi = _num(self.lo), _num(self.hi)
        text = f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        for s, meaning in self.special:
            text += f" or {_num(s)} ({meaning})"
        return text


def _finite(value: float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range: finite, and out of every range
        return True


def _num(x: float) -> str:
    if float(x).is_integer() and abs(x) >= 10_000:
        return f"{int(x):_}"
    return f"{x:g}"


def _f(
    default: Any,
    help: str,
    choices: tuple[str, ...] | None = None,
    bound: Bound | None = None,
) -> Any:
    """A config field: its default, one-line ``help``, and for a string its
    ``choices``, for a number its `Bound` (checked by `Config.validate`)."""
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    if bound is not None:
        meta["bound"] = bound
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def default_actors() -> int:
    """One actor per CPU, leaving one for the learner and the replay."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class EnvConfig:
    env: str = _f(
        "ALE/Pong-v5",
        "game: a gymnasium id (ALE/Pong-v5, PongNoFrameskip-v4) or a bare game "
        "name (pong, ms_pacman); ids keep their registered sticky-action setting",
    )
    sticky_actions: float = _f(
        -1.0,
        "repeat-action probability; -1 keeps the id's own (0.25 for ALE/*-v5 and "
        "bare names, 0 for *NoFrameskip-v4) [Machado et al. 2018]",
        bound=Bound(0, 1, "a probability", special=((-1, "the id's own"),)),
    )
    full_action_space: bool = _f(
        False, "use all 18 Atari actions instead of the game's minimal set"
    )
    episodic_life: bool = _f(
        False,
        "a lost life is a terminal for the learner, the game goes on (DQN 2015; off per "
        "Machado et al. 2018); ALE only",
    )
    max_episode_frames: int = _f(
        108_000,
        "emulator frames per episode cap (30 min of play, standard)",
        bound=Bound(1, 10**8, "emulator frames per episode; 10^8 is 19 days of play"),
    )
    noop_max: int = _f(
        30,
        "up to this many no-op actions at reset (DQN evaluation protocol)",
        bound=Bound(0, 10_000, "no-ops at reset; the evaluation protocol uses 30"),
    )
    clip_rewards: bool = _f(True, "train on sign(reward); raw scores are still logged")


@dataclass
class ReplayConfig:
    redis_url: str = _f(
        "",
        "redis://[:PASSWORD@]host:port[/db] of the replay; comma-separated for several "
        "shards; empty: $APEX_REDIS_URL, else embedded redis-server(s). A password given "
        "here is visible to every local user in ps: prefer $APEX_REDIS_URL or --redis-url-file",
    )
    redis_url_file: str = _f(
        "",
        "file holding the replay's Redis URL (read once at start; keep it mode 600); "
        "instead of --redis-url",
    )
    shards: int = _f(
        1,
        "replay shards (one redis-server each) when --redis-url is empty",
        bound=Bound(1, 64, "one redis-server and one Ray actor each, all on the driver's node"),
    )
    capacity: int = _f(
        1_000_000,
        "replay capacity in transitions, all shards together (Ape-X: 2M)",
        bound=Bound(
            1,
            10**9,
            "~550 B of RAM per transition in Redis and the index, so 10^9 needs ~0.55 TB; Ape-X used 2M",
        ),
    )
    min_replay: int = _f(
        20_000,
        "transitions stored before learning starts",
        bound=Bound(1, 10**9, "transitions stored before learning; at most --capacity"),
    )
    codec: str = _f(
        "lz4",
        "frame compression: fastest decode per byte saved on Atari frames",
        ("lz4", "zstd", "zstd-dict", "none"),
    )
    alpha: float = _f(
        0.6,
        "priority exponent (Schaul et al. 2016, Ape-X)",
        bound=Bound(0, 1, "priority exponent: 0 uniform, 1 fully proportional"),
    )
    beta: float = _f(
        0.4,
        "importance-weight exponent at start (Ape-X: 0.4), annealed to 1 (Schaul et al. "
        "2016; Ape-X kept it fixed)",
        bound=Bound(0, 1, "importance-weight exponent: 1 corrects fully"),
    )
    beta_anneal_updates: int = _f(
        1_000_000,
        "learner updates over which beta reaches 1",
        bound=Bound(1, 10**10, "learner updates; Ape-X ran ~10^6"),
    )
    samples_per_insert: float = _f(
        8.0,
        "max sampled/inserted transitions ratio (learner waits above it); 0 = unlimited",
        bound=Bound(
            0.01,
            10_000,
            "sampled/inserted ratio; below 0.01 use 0 (no limit) instead",
            special=((0, "unlimited"),),
        ),
    )
    loader_workers: int = _f(
        2,
        "loader processes (fetch + decode) feeding the learner",
        bound=Bound(1, 64, "loader processes next to the driver (one core each at most)"),
    )
    prefetch: int = _f(
        4,
        "batches queued ahead of the learner",
        bound=Bound(1, 64, "batches queued in RAM, each 2 x B x 4 x 84 x 84 bytes: 29 MB at B=512"),
    )
    data_dir: str = _f("", "directory for embedded redis-server data (default: LOGDIR/redis)")
    replay_reset: bool = _f(
        False,
        "delete the replay the shards' Redis holds (this namespace only) and start an "
        "empty one; without it a replay made with other settings stops the run",
    )


@dataclass
class ActorConfig:
    actors: int = _f(
        default_actors,
        "actor processes (1 CPU each); default: CPUs minus one, at least 1",
        bound=Bound(1, 10_000, "one CPU each; Ape-X used 360"),
    )
    envs_per_actor: int = _f(
        16,
        "environments stepped together by one actor (batched inference)",
        bound=Bound(1, 1024, "environments stepped and inferred together by one actor"),
    )
    n_step: int = _f(
        3,
        "n-step return length (Ape-X: 3)",
        bound=Bound(1, 100, "return length in agent steps; Ape-X used 3"),
    )
    gamma: float = _f(0.99, "discount factor", bound=Bound(0, 1, "a discount", lo_open=True))
    exploration: str = _f(
        "apex",
        "apex: fixed per-env eps_i = eps_base**(1 + eps_alpha*i/(N-1)); "
        "exp/linear: one schedule decaying from eps_start to eps_end",
        ("apex", "exp", "linear"),
    )
    eps_base: float = _f(
        0.4, "Ape-X epsilon base", bound=Bound(0, 1, "an epsilon", lo_open=True, hi_open=True)
    )
    eps_alpha: float = _f(
        7.0,
        "Ape-X epsilon exponent spread",
        bound=Bound(0, 100, "exponent spread; 100 already gives eps_N ~ 1e-40"),
    )
    eps_start: float = _f(1.0, "decaying schedule: start epsilon", bound=Bound(0, 1, "an epsilon"))
    eps_end: float = _f(0.01, "decaying schedule: final epsilon", bound=Bound(0, 1, "an epsilon"))
    eps_decay_frames: int = _f(
        1_000_000,
        "decaying schedule: env frames (per actor) to reach eps_end",
        bound=Bound(1, 10**12, "env frames per actor"),
    )
    push_every: int = _f(
        25,
        "vector steps between pushes to the replay (one round trip each)",
        bound=Bound(1, 10_000, "vector steps per push; a push holds steps x envs transitions"),
    )
    weight_poll_steps: int = _f(
        100,
        "vector steps between checks for newer weights (Ape-X: 400 frames)",
        bound=Bound(1, 10**6, "vector steps between weight checks"),
    )
    local_buffer_mb: float = _f(
        64.0,
        "MB of compressed pushes an actor keeps while the replay is unreachable "
        "(oldest dropped, counted)",
        bound=Bound(
            0.01,
            65_536,
            "MB per actor: a Pong transition with its lz4 frame is ~0.4 KB (64 MB: ~150K), "
            "a busier game's up to ~2 KB",
        ),
    )


@dataclass
class LearnerConfig:
    batch_size: int = _f(
        0,
        "minibatch size; 0 = the profile's (gpu 512 as Ape-X, cpu 32), else 512 on CUDA, 64 on CPU",
        bound=Bound(1, 8192, "transitions per update", special=((0, "auto"),)),
    )
    optimizer: str = _f("adam", "adam, or centered rmsprop as in Ape-X", ("adam", "rmsprop"))
    lr: float = _f(
        0.0,
        "learning rate; 0 = 1e-4 for adam, 0.00025/4 for rmsprop (Ape-X)",
        bound=Bound(
            0, 1, "a learning rate", lo_open=True, special=((0, "the optimizer's default"),)
        ),
    )
    target_update: int = _f(
        2_500,
        "learner updates between target-network copies (Ape-X: 2500)",
        bound=Bound(1, 10**8, "learner updates between target copies"),
    )
    grad_clip: float = _f(
        40.0,
        "gradient-norm clip (Ape-X: 40)",
        bound=Bound(0, 10**6, "a gradient norm", lo_open=True),
    )
    network: str = _f(
        "",
        "Q-network torso: nature (Mnih et al. 2015, Ape-X) or small (Mnih et al. 2013: "
        "~2.5x the updates/s on a CPU); empty: the --profile's choice",
        ("", "nature", "small"),
    )
    dueling: bool = _f(True, "dueling value/advantage head (Wang et al. 2016)")
    double: bool = _f(True, "double-DQN target (van Hasselt et al. 2016)")
    publish_seconds: float = _f(
        1.0,
        "seconds of training between weight broadcasts",
        bound=Bound(0.01, 3600, "seconds between weight broadcasts"),
    )
    checkpoint_minutes: float = _f(
        5.0,
        "minutes between checkpoints (also written at exit)",
        bound=Bound(
            0.05,
            10_080,
            "minutes between checkpoints: more often than every 3 s slows training; at most a week",
        ),
    )
    keep_checkpoints: int = _f(
        3,
        "checkpoints kept (LOGDIR/checkpoint-<updates>.pt; checkpoint.pt is the newest)",
        bound=Bound(1, 1000, "checkpoints kept on disk, ~20 MB each"),
    )
    device: str = _f("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N")
    compile: bool = _f(False, "torch.compile the network (CUDA only; slow first steps)")
    learner_dtype: str = _f(
        "auto",
        "precision of the learner's trunk (convolutions, hidden layers): bfloat16 autocast "
        "(output layers, targets, loss stay float32), float32, or auto: bfloat16 where a "
        "start-up probe times it faster",
        ("auto", "float32", "bfloat16"),
    )
    torch_threads: int = _f(
        0,
        "CPU threads for the learner's torch; 0 = the cores no local actor takes (cpu "
        "profile: set by it), else torch's default",
        bound=Bound(0, 1024, "CPU threads", special=((0, "torch's default"),)),
    )


@dataclass
class RunConfig:
    profile: str = _f(
        "auto",
        "hardware profile filling the settings not given: gpu (the published Ape-X "
        "settings), cpu (a learner on a few cores: batch 32, no Double DQN, ...), or "
        "auto: gpu when the learner gets a CUDA device; printed at start, and stored "
        "resolved in config.json",
        ("auto", "cpu", "gpu"),
    )
    logdir: str = _f("", "checkpoints, TensorBoard logs and redis data; default runs/<game>-<time>")
    max_seconds: float = _f(
        0.0,
        "stop after this many seconds; 0 = no limit",
        bound=Bound(0, 31_536_000, "at most a year", special=((0, "no limit"),)),
    )
    max_frames: int = _f(
        0,
        "stop after this many env frames (ALE: emulator frames, frame skip counted; other envs: steps); 0 = no limit",
        bound=Bound(0, 10**12, "env frames; Ape-X used 2.3 x 10^10", special=((0, "no limit"),)),
    )
    max_updates: int = _f(
        0,
        "stop after this many learner updates (resumed ones included); 0 = no limit. "
        "Bounds a run by work, not time: the same run on a slow or a busy machine",
        bound=Bound(0, 10**12, "learner updates", special=((0, "no limit"),)),
    )
    max_outage_minutes: float = _f(
        30.0,
        "stop the run (exit 1, the checkpoint written) when the replay has been "
        "unavailable this long without a break; 0 = wait forever",
        bound=Bound(0.1, 10_080, "minutes, at most a week", special=((0, "wait forever"),)),
    )
    resume: str = _f(
        "",
        "checkpoint to continue from: its run's settings, logdir and replay, counters, "
        "optimizer and schedules (flags given with it still apply)",
    )
    summary_json: str = _f("", "write a JSON summary of the run here at exit")
    ray_address: str = _f(
        "", "Ray cluster address (auto, host:port, ray://...); empty starts local Ray"
    )
    in_process: bool = _f(
        False,
        "actors, replay shards and learner in this one process, without Ray (the "
        "same classes, a real Redis): for pdb and fast step-bound tests; slower on "
        "several cores (one interpreter)",
    )
    log_every: float = _f(
        10.0,
        "seconds between console progress lines",
        bound=Bound(0.1, 86_400, "seconds between progress lines"),
    )
    seed: int = _f(
        0,
        "base random seed",
        bound=Bound(
            0,
            2**31 - 1,
            "seeds torch, numpy and ALE, which takes int32 seeds; evaluate seeds env j with seed + j",
        ),
    )
    track: str = _f(
        "none",
        "experiment tracking: wandb syncs the TensorBoard scalars (evaluations included) and "
        "the run's summary to Weights & Biases (pip install 'apex-dqn[wandb]'; the API key "
        "comes from $WANDB_API_KEY or 'wandb login', never from a flag)",
        ("none", "wandb"),
    )
    wandb_project: str = _f("apex-dqn", "W&B project of --track wandb")
    wandb_entity: str = _f("", "W&B team or user of --track wandb; empty: the API key's default")
    wandb_mode: str = _f(
        "",
        "--track wandb: online uploads while training, offline writes the run under "
        "$WANDB_DIR (default LOGDIR) for a later 'wandb sync'; empty: $WANDB_MODE, else online",
        ("", "online", "offline"),
    )


@dataclass
class EvalConfig:
    """Greedy evaluation while training runs (`learner.evaluator`): a separate
    1-CPU Ray actor plays the newest weights under the published protocol (no
    sticky actions, up to 30 no-op starts, 108K-frame cap, epsilon 0.001), because
    the training return mixes every actor's epsilon and is not the policy's score."""

    eval_every_minutes: float = _f(
        10.0,
        "minutes between evaluations of the newest weights (the learner never waits "
        "for one); 0 = off",
        bound=Bound(
            0.01, 10_080, "minutes between evaluations, at most a week", special=((0, "off"),)
        ),
    )
    eval_episodes: int = _f(
        10,
        "episodes per evaluation (10: a mean within a few points on most games)",
        bound=Bound(1, 10_000, "whole episodes per evaluation; published tables use 30"),
    )
    eval_video_every: int = _f(
        5,
        "every K-th evaluation also writes one MP4 to LOGDIR/videos/; 0 = never",
        bound=Bound(1, 10**6, "evaluations per video", special=((0, "never"),)),
    )
    keep_videos: int = _f(
        20,
        "evaluation MP4s kept in LOGDIR/videos/ (the newest; older ones are deleted)",
        bound=Bound(1, 10**6, "MP4s kept on disk, ~0.1-2 MB each"),
    )


# Paths that end up inside the embedded redis-server's configuration (its data directory
# lies under LOGDIR unless --data-dir says otherwise): a quote, a backslash or a
# newline there would end the value and start a directive of the path's choosing.
CONF_PATH_FIELDS = ("data_dir", "logdir")
PATH_FIELDS = ("data_dir", "logdir", "resume", "summary_json", "redis_url_file")
_CONF_UNSAFE = set("\"'\\")
_DEVICE = re.compile(r"auto|cpu|cuda|cuda:(0|[1-9]\d{0,2})")


SECTIONS: dict[str, type] = {
    "env": EnvConfig,
    "replay": ReplayConfig,
    "actor": ActorConfig,
    "learner": LearnerConfig,
    "run": RunConfig,
    "eval": EvalConfig,
}

# Every int and float field's allowed range and why, declared with the field
# (``bound=``), checked in Config.validate; tests/test_config_cli.py checks that no
# numeric field is missing one. Bytes per transition (the capacity bound): ~450 in
# Redis (docs/benchmarks.md, bench/replay.py) + ~100 of index in the shard process
# (an 80-byte record, the priority and the sum tree).
BOUNDS: dict[str, Bound] = {
    f.name: f.metadata["bound"]
    for cls in SECTIONS.values()
    for f in fields(cls)
    if "bound" in f.metadata
}


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Not a setting: the line saying which hardware profile the CLI applied and what
    # it set (`deploy.cli.config_from_args`); empty for a Config built in code.
    profile_note = ""

    # ---- construction -------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build from ``{section: {field: value}}``; unknown keys are errors."""
        cfg = cls()
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections, got {type(data).__name__}"
            )
        for section, values in data.items():
            if section not in SECTIONS:
                raise ConfigError(
                    f"{source}: unknown section [{section}]{_suggest(section, SECTIONS)}; "
                    f"sections are {', '.join(SECTIONS)}"
                )
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section [{section}] must be a table of key = value")
            cfg.update(section, values, source)
        return cfg

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Config:
        return cls.from_dict(load_file(path), source=str(path))

    def update(self, section: str, values: dict[str, Any], source: str = "config") -> None:
        obj = getattr(self, section)
        hints = get_type_hints(type(obj))
        names = {f.name for f in fields(obj)}
        for key, value in values.items():
            if key not in names:
                raise ConfigError(
                    f"{source}: unknown key '{key}' in [{section}]{_suggest(key, names)}; "
                    f"run 'apex-dqn train --help' for the valid keys"
                )
            setattr(obj, key, _coerce(value, hints[key], f"{source}: [{section}] {key}"))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values for config.json and checkpoints, the Redis password
        redacted (``redis://:***@host``): ``--resume`` takes the URL again from
        ``$APEX_REDIS_URL``, ``--redis-url-file`` or ``--redis-url``."""
        data = asdict(self)
        data["replay"]["redis_url"] = redact_url(data["replay"]["redis_url"])
        return data

    # ---- derived values ------------------------------------------------
    def redis_urls(self) -> list[str]:
        return [u.strip() for u in self.replay.redis_url.split(",") if u.strip()]

    def num_shards(self) -> int:
        urls = self.redis_urls()
        return len(urls) if urls else self.replay.shards

    # ---- validation ----------------------------------------------------
    def validate(self) -> Config:
        """Raise `ConfigError` naming the first bad value and what to do; return
        self when fine. Every number must be finite and inside its `BOUNDS`
        range; then the cross-field rules, the device, the paths and the URLs."""
        for section, f in iter_fields():
            value = getattr(getattr(self, section), f.name)
            bound = BOUNDS.get(f.name)
            if bound is not None and not bound.allows(value):
                finite = "" if _finite(value) else "a finite number "
                raise ConfigError(
                    f"bad config value: {f.name}={value!r} must be {finite}in "
                    f"{bound.describe()}: {bound.why}. Set {_flag(f.name)} "
                    f"(or {f.name} under [{section}]) within that range"
                )
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(
                    f"bad config value: {f.name}={value!r}; choose one of {', '.join(choices)}"
                )
        r, a, learner = self.replay, self.actor, self.learner
        cross: list[tuple[bool, str]] = [
            (
                r.min_replay <= r.capacity,
                f"min_replay={r.min_replay} must not exceed capacity={r.capacity}",
            ),
            (
                a.eps_end <= a.eps_start,
                f"need eps_end ({a.eps_end}) <= eps_start ({a.eps_start})",
            ),
            (
                r.capacity >= self.batch_size("cpu"),
                f"capacity={r.capacity} is below the batch size {self.batch_size('cpu')}; "
                "raise --capacity",
            ),
            (
                r.min_replay >= self.batch_size("cpu"),
                f"min_replay={r.min_replay} is below the batch size "
                f"{self.batch_size('cpu')}; raise --min-replay",
            ),
            (
                self.num_shards() <= BOUNDS["shards"].hi,
                f"{self.num_shards()} Redis URLs: at most {BOUNDS['shards'].hi:g} shards",
            ),
            (
                r.capacity >= self.num_shards(),
                f"capacity={r.capacity} is below the number of shards ({self.num_shards()})",
            ),
            (
                not (self.run.in_process and self.run.ray_address),
                "in_process runs without Ray, so ray_address "
                f"({self.run.ray_address!r}) cannot be used with it; drop one of "
                "--in-process and --ray-address",
            ),
        ]
        for ok, msg in cross:
            if not ok:
                raise ConfigError(f"bad config value: {msg}")
        if not _DEVICE.fullmatch(learner.device):
            raise ConfigError(
                f"bad config value: device={learner.device!r}; use auto, cpu, cuda or "
                "cuda:N with N the GPU's index (0, 1, ...)"
            )
        self._validate_paths()
        self._validate_urls()
        return self

    def _validate_paths(self) -> None:
        for name in PATH_FIELDS:
            section = next(s for s, f in iter_fields() if f.name == name)
            path = getattr(getattr(self, section), name)
            bad = sorted({c for c in path if ord(c) < 32 or ord(c) == 127})
            if name in CONF_PATH_FIELDS:
                bad += sorted(_CONF_UNSAFE & set(path))
                if bad:
                    raise ConfigError(
                        f"bad config value: {name}={path!r} contains "
                        f"{', '.join(repr(c) for c in bad)}: the embedded redis-server's data "
                        "directory (under --logdir unless --data-dir is set) is written into "
                        "its configuration, where a newline, a quote or a backslash would end the "
                        "value and start another directive. Choose a path without control "
                        "characters, quotes or backslashes"
                    )
            elif bad:
                raise ConfigError(
                    f"bad config value: {name}={path!r} contains control characters "
                    f"({', '.join(repr(c) for c in bad)}); choose a path without newlines, "
                    "tabs or other control characters"
                )

    def _validate_urls(self) -> None:
        for url in self.redis_urls():
            shown = redact_url(url)
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(
                    f"bad config value: redis_url {shown!r} must start with redis://, "
                    "rediss:// or unix://"
                )
            if REDACTED in url_secrets(url):
                raise ConfigError(
                    f"bad config value: redis_url {shown!r} holds a redacted password "
                    f"({REDACTED}, as written into config.json and checkpoints); give the "
                    f"real URL through ${REDIS_URL_ENV}, --redis-url-file or --redis-url"
                )

    def resolve_redis_url(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """Fill ``replay.redis_url`` from ``--redis-url-file`` or ``$APEX_REDIS_URL``.

        Precedence: ``redis_url`` (flag or config file) > ``redis_url_file`` >
        ``$APEX_REDIS_URL`` > none (embedded redis-servers). The file is read
        once, here. Returns warnings for the user (a file others can read, a
        password on the command line is the caller's to warn about); raises
        `ConfigError` for both a URL and a file, or an unreadable/empty file.
        """
        environ = os.environ if environ is None else environ
        r = self.replay
        warnings: list[str] = []
        if r.redis_url and r.redis_url_file:
            raise ConfigError(
                "bad config value: both redis_url and redis_url_file are set; give one "
                "(--redis-url-file keeps the password out of ps and shell history)"
            )
        if r.redis_url_file:
            path = Path(r.redis_url_file).expanduser()
            try:
                mode = path.stat().st_mode
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"cannot read --redis-url-file {r.redis_url_file}: "
                    f"{exc.strerror if isinstance(exc, OSError) else exc}; "
                    "give a readable file holding one redis:// URL"
                ) from None
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(lines) != 1:
                raise ConfigError(
                    f"--redis-url-file {r.redis_url_file} holds {len(lines)} non-empty lines; "
                    "it must hold exactly one line: the URL (comma-separate several shards)"
                )
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                warnings.append(
                    f"warning: {r.redis_url_file} (mode {stat.S_IMODE(mode):03o}) can be read "
                    f"by other users and holds a password; chmod 600 {r.redis_url_file}"
                )
            r.redis_url = lines[0]
        elif not r.redis_url and environ.get(REDIS_URL_ENV, "").strip():
            r.redis_url = environ[REDIS_URL_ENV].strip()
        return warnings

    def batch_size(self, device_type: str) -> int:
        if self.learner.batch_size > 0:
            return self.learner.batch_size
        return 512 if device_type == "cuda" else 64

    def network(self) -> str:
        """The Q-network torso: ``learner.network``, or ``nature`` when no profile chose."""
        return self.learner.network or "nature"

    def learning_rate(self) -> float:
        if self.learner.lr > 0:
            return self.learner.lr
        return 1e-4 if self.learner.optimizer == "adam" else 0.00025 / 4


def iter_fields() -> list[tuple[str, Any]]:
    """``(section, dataclass Field)`` for every config field, in declaration order."""
    return [(name, f) for name, cls in SECTIONS.items() for f in fields(cls)]


def field_type(section: str, name: str) -> Any:
    return get_type_hints(SECTIONS[section])[name]


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {p}: invalid TOML: {exc}") from None
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - pyyaml is a dependency
            raise ConfigError("YAML config files need PyYAML: pip install pyyaml") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p}: invalid YAML: {exc}") from None
        return data or {}
    raise ConfigError(f"config file {p}: unknown format; use .toml, .yaml or .yml")


def parse_flag(text: str, typ: Any, name: str) -> Any:
    """A flag's text as ``typ`` with the config file's rules (``--capacity 2e6``
    is 2,000,000); raises `ConfigError`."""
    return _coerce(text, typ, _flag(name))


def _coerce(value: Any, typ: Any, where: str) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = 0.5
                if as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _suggest(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
