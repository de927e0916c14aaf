"""``apex-dqn train --check``: validate a configuration and print it resolved.

Checks everything that can be checked without starting anything: every value
(`Config.validate`), the game id (`common.env.resolve_env`: the registry and the
ROM list, no emulator), the shape of each ``--redis-url``, and the ``--resume``
checkpoint (read from disk, its game compared). It starts no Ray, no Redis and no
environment, and it does not contact ``--redis-url`` or ``--ray-address`` (a
config is often checked on a laptop before it runs on a cluster; ``train``
reaches them first thing and fails fast).

The output is TOML that ``--config`` reads back (comments say what was derived),
with every password replaced by ``***``.
"""

from __future__ import annotations

import json
import math
from typing import Any
from urllib.parse import urlsplit

from common.config import Config, ConfigError
from common.redact import REDACTED, redact_url


def check(cfg: Config) -> str:
    """Validate ``cfg`` fully; return the resolved config as TOML text.

    Raises `ConfigError` with a message naming the bad value and what to do.
    """
    from common.env import UnknownEnvError, resolve_env

    cfg.validate()
    try:
        spec = resolve_env(cfg.env.env, cfg.env)
    except UnknownEnvError as exc:
        raise ConfigError(str(exc)) from None
    for url in cfg.redis_urls():
        _check_url(url)
    if cfg.run.resume:
        from learner.checkpoint import CheckpointError, load_resume

        try:  # what train checks, but the action count (that needs the emulator)
            load_resume(cfg, spec.env_id)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None

    header = [
        "# apex-dqn train --check: this configuration is valid (nothing was started).",
        f"# game: {spec.env_id} ({spec.kind}"
        + (f" ROM {spec.game}, sticky actions {spec.sticky:g}" if spec.kind == "ale" else "")
        + ")",
        f"# derived: batch size {cfg.batch_size('cuda')} on CUDA / {cfg.batch_size('cpu')} on CPU, "
        f"learning rate {cfg.learning_rate():g}, {cfg.num_shards()} replay shard(s)",
    ]
    if cfg.profile_note:
        header.append(f"# {cfg.profile_note}")
    if cfg.eval.eval_every_minutes > 0:
        header.append(
            f"# evaluation: {cfg.eval.eval_episodes} episodes every "
            f"{cfg.eval.eval_every_minutes:g} min on one more CPU"
        )
    else:
        header.append("# evaluation: off")
    if cfg.redis_urls() or cfg.run.ray_address:
        header.append("# not contacted: --redis-url / --ray-address (train reaches them first)")
    return "\n".join(header) + "\n" + to_toml(redacted(cfg.to_dict()))


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ConfigError(
            f"bad config value: redis_url {redact_url(url)!r} has an invalid port; "
            "use redis://[:password@]host:port/db"
        ) from None
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError(
            f"bad config value: redis_url {redact_url(url)!r} has no host; "
            "use redis://[:password@]host:port/db"
        )


def redacted(data: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A copy of ``Config.to_dict()`` output (whose ``redis_url`` is already
    redacted) with every secret replaced: URL passwords in any other string value,
    and the whole value of any key naming a password, token or secret."""
    out: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        out[section] = {}
        for key, value in values.items():
            if isinstance(value, str) and value:
                if any(word in key for word in ("password", "token", "secret")):
                    value = REDACTED
                elif "://" in value:
                    value = redact_url(value)
            out[section][key] = value
    return out


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Sections of str/int/float/bool values as TOML (what `Config.from_dict` reads)."""
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"\n[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML form for {value!r}")
