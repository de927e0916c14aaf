"""Typed configuration: one dataclass per component, one `Config` holding them.

Every field has a default with a one-line reason (its ``help``). Flags and config
files map onto fields 1:1: the field ``envs_per_actor`` of section ``actor`` is
the flag ``--envs-per-actor`` and the key ``envs_per_actor`` under ``[actor]`` in
a TOML/YAML file. Field names are unique across sections so that each flag names
exactly one field. Nothing here is global state: build a `Config`, validate it,
pass it down.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says which."""


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
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
        108_000, "emulator frames per episode cap (30 min of play, standard)"
    )
    noop_max: int = _f(30, "up to this many no-op actions at reset (DQN evaluation protocol)")
    clip_rewards: bool = _f(True, "train on sign(reward); raw scores are still logged")


@dataclass
class ReplayConfig:
    redis_url: str = _f(
        "",
        "redis://host:port[/db] of the replay; comma-separated for several shards; "
        "empty starts embedded redis-server(s)",
    )
    shards: int = _f(1, "replay shards (one redis-server each) when --redis-url is empty")
    capacity: int = _f(1_000_000, "replay capacity in transitions, all shards together (Ape-X: 2M)")
    min_replay: int = _f(20_000, "transitions stored before learning starts")
    codec: str = _f(
        "lz4",
        "frame compression: fastest decode per byte saved on Atari frames",
        ("lz4", "zstd", "zstd-dict", "none"),
    )
    alpha: float = _f(0.6, "priority exponent (Schaul et al. 2016, Ape-X)")
    beta: float = _f(
        0.4,
        "importance-weight exponent at start (Ape-X: 0.4), annealed to 1 (Schaul et al. "
        "2016; Ape-X kept it fixed)",
    )
    beta_anneal_updates: int = _f(1_000_000, "learner updates over which beta reaches 1")
    samples_per_insert: float = _f(
        8.0,
        "max sampled/inserted transitions ratio (learner waits above it); 0 = unlimited",
    )
    loader_workers: int = _f(2, "parallel sampling/decoding workers feeding the learner")
    prefetch: int = _f(4, "batches queued ahead of the learner")
    data_dir: str = _f("", "directory for embedded redis-server data (default: LOGDIR/redis)")


@dataclass
class ActorConfig:
    actors: int = _f(
        default_actors, "actor processes (1 CPU each); default: CPUs minus one, at least 1"
    )
    envs_per_actor: int = _f(16, "environments stepped together by one actor (batched inference)")
    n_step: int = _f(3, "n-step return length (Ape-X: 3)")
    gamma: float = _f(0.99, "discount factor")
    exploration: str = _f(
        "apex",
        "apex: fixed per-env eps_i = eps_base**(1 + eps_alpha*i/(N-1)); "
        "exp/linear: one schedule decaying from eps_start to eps_end",
        ("apex", "exp", "linear"),
    )
    eps_base: float = _f(0.4, "Ape-X epsilon base")
    eps_alpha: float = _f(7.0, "Ape-X epsilon exponent spread")
    eps_start: float = _f(1.0, "decaying schedule: start epsilon")
    eps_end: float = _f(0.01, "decaying schedule: final epsilon")
    eps_decay_frames: int = _f(
        1_000_000, "decaying schedule: env frames (per actor) to reach eps_end"
    )
    push_every: int = _f(25, "vector steps between pushes to the replay (one round trip each)")
    weight_poll_steps: int = _f(
        100, "vector steps between checks for newer weights (Ape-X: 400 frames)"
    )
    local_buffer: int = _f(
        50_000, "transitions buffered while the replay is unreachable (oldest dropped)"
    )


@dataclass
class LearnerConfig:
    batch_size: int = _f(0, "minibatch size; 0 = 512 on CUDA, 64 on CPU (Ape-X: 512)")
    optimizer: str = _f("adam", "adam, or centered rmsprop as in Ape-X", ("adam", "rmsprop"))
    lr: float = _f(0.0, "learning rate; 0 = 1e-4 for adam, 0.00025/4 for rmsprop (Ape-X)")
    target_update: int = _f(2_500, "learner updates between target-network copies (Ape-X: 2500)")
    grad_clip: float = _f(40.0, "gradient-norm clip (Ape-X: 40)")
    dueling: bool = _f(True, "dueling value/advantage head (Wang et al. 2016)")
    double: bool = _f(True, "double-DQN target (van Hasselt et al. 2016)")
    publish_seconds: float = _f(1.0, "seconds of training between weight broadcasts")
    checkpoint_minutes: float = _f(5.0, "minutes between checkpoints (also written at exit)")
    device: str = _f("auto", "torch device: auto (cuda if available), cpu, cuda, cuda:N")
    compile: bool = _f(False, "torch.compile the network (CUDA only; slow first steps)")
    learner_dtype: str = _f(
        "auto",
        "precision of the learner's trunk (convolutions, hidden layers): bfloat16 autocast "
        "(output layers, targets, loss stay float32), float32, or auto: bfloat16 where a "
        "start-up probe times it faster",
        ("auto", "float32", "bfloat16"),
    )
    torch_threads: int = _f(0, "CPU threads for the learner's torch; 0 = torch default")


@dataclass
class RunConfig:
    logdir: str = _f("", "checkpoints, TensorBoard logs and redis data; default runs/<game>-<time>")
    max_seconds: float = _f(0.0, "stop after this many seconds; 0 = no limit")
    max_frames: int = _f(
        0,
        "stop after this many env frames (ALE: emulator frames, frame skip counted; other envs: steps); 0 = no limit",
    )
    resume: str = _f("", "checkpoint file to continue from (counters, optimizer and schedules)")
    summary_json: str = _f("", "write a JSON summary of the run here at exit")
    ray_address: str = _f(
        "", "Ray cluster address (auto, host:port, ray://...); empty starts local Ray"
    )
    log_every: float = _f(10.0, "seconds between console progress lines")
    seed: int = _f(0, "base random seed")


SECTIONS: dict[str, type] = {
    "env": EnvConfig,
    "replay": ReplayConfig,
    "actor": ActorConfig,
    "learner": LearnerConfig,
    "run": RunConfig,
}


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    run: RunConfig = field(default_factory=RunConfig)

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
        return asdict(self)

    # ---- derived values ------------------------------------------------
    def redis_urls(self) -> list[str]:
        return [u.strip() for u in self.replay.redis_url.split(",") if u.strip()]

    def num_shards(self) -> int:
        urls = self.redis_urls()
        return len(urls) if urls else self.replay.shards

    # ---- validation ----------------------------------------------------
    def validate(self) -> Config:
        """Raise `ConfigError` naming the first bad value; return self when fine."""
        e, r, a, learner, run = self.env, self.replay, self.actor, self.learner, self.run
        checks: list[tuple[bool, str]] = [
            (
                e.sticky_actions == -1.0 or 0.0 <= e.sticky_actions <= 1.0,
                f"sticky_actions={e.sticky_actions} must be in [0, 1] (or -1 for the id's default)",
            ),
            (e.max_episode_frames > 0, f"max_episode_frames={e.max_episode_frames} must be > 0"),
            (e.noop_max >= 0, f"noop_max={e.noop_max} must be >= 0"),
            (a.actors >= 1, f"actors={a.actors} must be >= 1"),
            (a.envs_per_actor >= 1, f"envs_per_actor={a.envs_per_actor} must be >= 1"),
            (a.n_step >= 1, f"n_step={a.n_step} must be >= 1"),
            (0.0 < a.gamma <= 1.0, f"gamma={a.gamma} must be in (0, 1]"),
            (0.0 < a.eps_base < 1.0, f"eps_base={a.eps_base} must be in (0, 1)"),
            (a.eps_alpha >= 0.0, f"eps_alpha={a.eps_alpha} must be >= 0"),
            (
                0.0 <= a.eps_end <= a.eps_start <= 1.0,
                f"need 0 <= eps_end ({a.eps_end}) <= eps_start ({a.eps_start}) <= 1",
            ),
            (a.eps_decay_frames >= 1, f"eps_decay_frames={a.eps_decay_frames} must be >= 1"),
            (a.push_every >= 1, f"push_every={a.push_every} must be >= 1"),
            (a.weight_poll_steps >= 1, f"weight_poll_steps={a.weight_poll_steps} must be >= 1"),
            (a.local_buffer >= 1, f"local_buffer={a.local_buffer} must be >= 1"),
            (r.shards >= 1, f"shards={r.shards} must be >= 1"),
            (r.capacity >= 1, f"capacity={r.capacity} must be >= 1"),
            (r.min_replay >= 1, f"min_replay={r.min_replay} must be >= 1"),
            (
                r.min_replay <= r.capacity,
                f"min_replay={r.min_replay} must not exceed capacity={r.capacity}",
            ),
            (0.0 <= r.alpha <= 1.0, f"alpha={r.alpha} must be in [0, 1]"),
            (0.0 <= r.beta <= 1.0, f"beta={r.beta} must be in [0, 1]"),
            (
                r.beta_anneal_updates >= 1,
                f"beta_anneal_updates={r.beta_anneal_updates} must be >= 1",
            ),
            (
                r.samples_per_insert >= 0.0,
                f"samples_per_insert={r.samples_per_insert} must be >= 0 (0 = unlimited)",
            ),
            (r.loader_workers >= 1, f"loader_workers={r.loader_workers} must be >= 1"),
            (r.prefetch >= 1, f"prefetch={r.prefetch} must be >= 1"),
            (learner.batch_size >= 0, f"batch_size={learner.batch_size} must be >= 1 (0 = auto)"),
            (learner.lr >= 0.0, f"lr={learner.lr} must be > 0 (0 = the optimizer's default)"),
            (learner.target_update >= 1, f"target_update={learner.target_update} must be >= 1"),
            (learner.grad_clip > 0.0, f"grad_clip={learner.grad_clip} must be > 0"),
            (
                learner.publish_seconds > 0.0,
                f"publish_seconds={learner.publish_seconds} must be > 0",
            ),
            (
                learner.checkpoint_minutes > 0.0,
                f"checkpoint_minutes={learner.checkpoint_minutes} must be > 0",
            ),
            (learner.torch_threads >= 0, f"torch_threads={learner.torch_threads} must be >= 0"),
            (run.max_seconds >= 0.0, f"max_seconds={run.max_seconds} must be >= 0"),
            (run.max_frames >= 0, f"max_frames={run.max_frames} must be >= 0"),
            (run.log_every > 0.0, f"log_every={run.log_every} must be > 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"bad config value: {msg}")
        for section, f in iter_fields():
            choices = f.metadata.get("choices")
            value = getattr(getattr(self, section), f.name)
            if choices and value not in choices:
                raise ConfigError(
                    f"bad config value: {f.name}={value!r}; choose one of {', '.join(choices)}"
                )
        batch = self.batch_size("cpu")
        if r.capacity < batch:
            raise ConfigError(
                f"bad config value: capacity={r.capacity} is below the batch size {batch}; raise --capacity"
            )
        if r.min_replay < batch:
            raise ConfigError(
                f"bad config value: min_replay={r.min_replay} is below the batch size {batch}; raise --min-replay"
            )
        if r.capacity < self.num_shards():
            raise ConfigError(
                f"bad config value: capacity={r.capacity} is below the number of shards"
            )
        if not learner.device == "auto" and not (
            learner.device == "cpu" or learner.device.startswith("cuda")
        ):
            raise ConfigError(
                f"bad config value: device={learner.device!r}; use auto, cpu, cuda or cuda:N"
            )
        for url in self.redis_urls():
            if not url.startswith(("redis://", "rediss://", "unix://")):
                raise ConfigError(
                    f"bad config value: redis_url {url!r} must start with redis://, rediss:// or unix://"
                )
        return self

    def batch_size(self, device_type: str) -> int:
        if self.learner.batch_size > 0:
            return self.learner.batch_size
        return 512 if device_type == "cuda" else 64

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


def _suggest(name: str, options: Any) -> str:
    close = difflib.get_close_matches(name, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
