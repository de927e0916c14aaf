"""The ``apex-dqn`` command line: ``train``, ``evaluate`` and ``plot``.

Every `common.config` field is a ``train`` flag (``envs_per_actor`` ->
``--envs-per-actor``). Precedence: defaults < ``--config FILE`` < flags.
Errors in user input exit with status 2 and one line saying what to fix.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from common.config import (
    BOUNDS,
    REDIS_URL_ENV,
    SECTIONS,
    Config,
    ConfigError,
    field_type,
    iter_fields,
    load_file,
    parse_flag,
)
from common.redact import url_secrets

EXIT_USAGE = 2
EXIT_FAILED = 1


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = Config()
    titles = {
        "env": "environment",
        "replay": "replay (Redis)",
        "actor": "actors",
        "learner": "learner",
        "run": "run",
        "eval": "evaluation during training",
    }
    groups = {s: parser.add_argument_group(t) for s, t in titles.items()}
    for section, f in iter_fields():
        typ = field_type(section, f.name)
        default = getattr(getattr(defaults, section), f.name)
        help_text = f.metadata["help"]
        if typ is bool:
            groups[section].add_argument(
                _flag(f.name),
                dest=f"{section}.{f.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{help_text} (default: {default})",
            )
            continue
        shown = "" if default == "" else f" (default: {default})"
        bound = BOUNDS.get(f.name)
        if bound is not None:
            shown += f"; range {bound.describe()}".replace("%", "%%")
        groups[section].add_argument(
            _flag(f.name),
            dest=f"{section}.{f.name}",
            type=_flag_type(typ, f.name),
            default=None,
            choices=f.metadata.get("choices"),
            metavar=f.name.upper(),
            help=f"{help_text}{shown}",
        )


def _flag_type(typ: type, name: str) -> Any:
    """argparse ``type=`` for a config field: the config file's parsing rules
    (``--capacity 2e6`` is an int), errors as argparse errors (exit 2)."""

    def parse(text: str) -> Any:
        try:
            return parse_flag(text, typ, name)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    parse.__name__ = typ.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apex-dqn",
        description="Distributed Ape-X DQN for Atari: Ray actors push compressed frames "
        "into a Redis replay, one PyTorch learner trains and broadcasts weights.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train an agent (default: Pong on local Ray with an embedded redis-server)",
        description="Train an agent. With no flags: ALE/Pong-v5, local Ray, embedded "
        "redis-server, CUDA if available. Flags override --config FILE (TOML/YAML, "
        "sections [env] [replay] [actor] [learner] [run] [eval] holding the same names "
        "with underscores). Ctrl-C stops cleanly and writes a final checkpoint. "
        f"The replay's Redis URL: --redis-url, else --redis-url-file, else ${REDIS_URL_ENV} "
        "(environment variable; keeps a password out of ps), else embedded redis-server(s). "
        "Numbers must lie in the [range] shown with each flag.",
    )
    train.add_argument("--config", metavar="FILE", help="TOML or YAML config file")
    train.add_argument(
        "--check",
        action="store_true",
        help="validate the config and flags, print the resolved config as TOML (passwords "
        "redacted) and exit 0, or exit 2 with the error; starts no Ray, Redis or env",
    )
    _add_config_flags(train)

    ev = sub.add_parser(
        "evaluate",
        help="play a checkpoint, print raw scores, write MP4 videos",
        description="Play a checkpoint under the published protocol that the human and "
        "random reference scores use (no sticky actions, up to 30 no-op starts, "
        "108,000-frame cap, epsilon 0.001), or with --sticky-actions the ALE/*-v5 "
        "protocol (sticky actions 0.25, no no-op starts); print the protocol, each "
        "episode's raw score, the mean/median/max and the human-normalized score.",
    )
    ev.add_argument("checkpoint", help="checkpoint file written by 'apex-dqn train'")
    ev.add_argument("--episodes", type=int, default=10, help="episodes to play (default: 10)")
    ev.add_argument(
        "--epsilon", type=float, default=0.001, help="exploration rate (default: 0.001)"
    )
    ev.add_argument("--video-dir", metavar="DIR", help="write one MP4 per episode here")
    ev.add_argument("--env", help="play another id of the same game (e.g. PongNoFrameskip-v4)")
    ev.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    ev.add_argument(
        "--sticky-actions",
        action="store_true",
        help="play the ALE/*-v5 protocol: sticky actions 0.25, no no-op starts "
        "(Machado et al. 2018); default: the published no-op-starts protocol",
    )
    ev.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON here (protocol, raw scores, mean, median, "
        "human-normalized)",
    )

    plot = sub.add_parser(
        "plot",
        help="draw training curves of runs into one PNG",
        description="Read the TensorBoard logs of one or more runs (RUN_DIR or "
        "RUN_DIR/tb) and draw, in one PNG, episode return against env frames and "
        "against wall-clock minutes (runs overlaid, labelled; evaluation returns "
        "too when the runs have them), plus updates/s and env frames/s.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (--logdir)")
    plot.add_argument(
        "-o", "--output", default="curves.png", help="PNG to write (default: curves.png)"
    )
    plot.add_argument(
        "--label",
        action="append",
        metavar="NAME",
        help="legend label per run, in order (default: the run directory's name)",
    )
    plot.add_argument(
        "--smooth",
        type=int,
        default=100,
        help="episodes in the moving average of training returns (default: 100)",
    )
    plot.add_argument("--title", help="figure title")
    return parser


def config_from_args(
    args: argparse.Namespace, warn: Any = lambda msg: print(msg, file=sys.stderr)
) -> Config:
    """Defaults < the hardware profile (`common.profile`) < the resumed checkpoint's
    settings < ``--config FILE`` < flags; the Redis URL resolved
    (`Config.resolve_redis_url`); validated. ``warn`` gets one line per warning.
    ``cfg.profile_note`` says which profile was applied and what it set.

    With ``--resume CKPT`` the run continues with the settings it was started
    with (game, replay, logdir: the checkpoint's directory), so ``--resume`` alone
    continues it; flags and a config file given with it still win. The
    checkpoint holds the Redis URL without its password: give it again.
    """
    file_data = load_file(args.config) if getattr(args, "config", None) else {}
    overrides: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            overrides.setdefault(section, {})[name] = value
    resume = overrides.get("run", {}).get("resume") or file_data.get("run", {}).get("resume")
    cfg = _resumed_config(resume) if resume else Config()
    for section, values in file_data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            Config.from_dict({section: values}, source=str(args.config))  # raises the error
        cfg.update(section, values, source=str(args.config))
    for section, values in overrides.items():
        cfg.update(section, values, source="flags")
    if resume:
        cfg.profile_note = f"profile {cfg.run.profile}: the resumed run's settings"
    else:
        explicit = {name for values in overrides.values() for name in values}
        explicit |= {n for v in file_data.values() if isinstance(v, dict) for n in v}
        cfg.profile_note = _apply_profile(cfg, explicit)
    flag_url = overrides.get("replay", {}).get("redis_url", "")
    if flag_url and url_secrets(flag_url):
        warn(
            "apex-dqn train: warning: the password in --redis-url is visible to every "
            f"local user (ps, /proc); pass the URL in ${REDIS_URL_ENV} or --redis-url-file"
        )
    for msg in cfg.resolve_redis_url():
        warn(f"apex-dqn train: {msg}")
    return cfg.validate()


def _apply_profile(cfg: Config, explicit: set[str]) -> str:
    """Resolve ``--profile`` (auto: gpu when the learner gets CUDA) and fill the
    settings not in ``explicit``; returns the line that says what was chosen."""
    import os

    from common import profile

    if cfg.run.profile not in profile.PROFILES:
        raise ConfigError(
            f"bad config value: profile={cfg.run.profile!r}; choose one of "
            f"{', '.join(profile.PROFILES)}"
        )
    cuda = False
    if cfg.run.profile == "auto" and cfg.learner.device == "auto":
        import torch

        cuda = torch.cuda.is_available()
    kind, reason = profile.resolve(cfg.run.profile, cfg.learner.device, cuda)
    applied = profile.apply(cfg, kind, explicit, cpus=os.cpu_count() or 2)
    return profile.describe(kind, reason, applied)


def _resumed_config(path: str) -> Config:
    """The settings of the run that wrote checkpoint ``path``."""
    from pathlib import Path

    from learner.checkpoint import CheckpointError, checkpoint_config

    try:
        stored = checkpoint_config(path)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    cfg = Config.from_dict(stored, source=f"checkpoint {path}")
    cfg.run.resume = path
    cfg.run.logdir = str(Path(path).resolve().parent)  # the run lives where its checkpoints are
    if "***" in cfg.replay.redis_url:  # stored without its password: give it again
        cfg.replay.redis_url = ""
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "train":
            cfg = config_from_args(args)
            from learner.tracking import require as require_tracking

            require_tracking(cfg)  # --track wandb without wandb: exit 2, nothing started
            if args.check:
                from deploy.check import check

                print(check(cfg), end="")
                return 0
            print(f"[apex] {cfg.profile_note}", flush=True)
            from deploy.launcher import LaunchError, RunError, train
            from learner.loop import NonFiniteLoss

            try:
                train(cfg)
            except LaunchError as exc:
                print(f"apex-dqn train: error: {exc}", file=sys.stderr)
                return EXIT_USAGE
            except (RunError, NonFiniteLoss) as exc:
                print(f"apex-dqn train: error: {exc}", file=sys.stderr)
                return EXIT_FAILED
            return 0
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "plot":
            return _plot(args)
    except ConfigError as exc:
        print(f"apex-dqn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_USAGE


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from learner.checkpoint import CheckpointError
    from learner.evaluate import MAX_PARALLEL, evaluate

    if not 1 <= args.episodes <= 1_000_000:
        raise ConfigError(f"--episodes={args.episodes} must be in [1, 1_000_000]")
    if not 0.0 <= args.epsilon <= 1.0:  # NaN fails this too
        raise ConfigError(f"--epsilon={args.epsilon} must be in [0, 1]")
    max_seed = int(BOUNDS["seed"].hi) - MAX_PARALLEL + 1
    if not 0 <= args.seed <= max_seed:
        raise ConfigError(
            f"--seed={args.seed} must be in [0, {max_seed}] (ALE takes int32 seeds; "
            "the parallel envs get seed + j)"
        )
    try:
        result = evaluate(
            args.checkpoint,
            episodes=args.episodes,
            epsilon=args.epsilon,
            video_dir=args.video_dir,
            env_override=args.env,
            seed=args.seed,
            sticky=args.sticky_actions,
        )
    except CheckpointError as exc:
        print(f"apex-dqn evaluate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from learner.plot import PlotError, plot_runs

    if args.smooth < 1:
        raise ConfigError(f"--smooth={args.smooth} must be >= 1")
    try:
        path = plot_runs(
            args.runs, args.output, labels=args.label, smooth=args.smooth, title=args.title
        )
    except PlotError as exc:
        print(f"apex-dqn plot: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
