"""Config validation and the CLI's handling of bad input (no Ray, no Redis needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.config import Config, ConfigError
from deploy.cli import build_parser, config_from_args


def parse(*argv: str) -> Config:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_flags_map_onto_fields_and_override_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[actor]\nactors = 3\nenvs_per_actor = 4\n[env]\nenv = "breakout"\n')
    cfg = parse("--config", str(path), "--envs-per-actor", "8", "--no-dueling")
    assert cfg.actor.actors == 3  # from the file
    assert cfg.actor.envs_per_actor == 8  # the flag wins
    assert cfg.env.env == "breakout"
    assert cfg.learner.dueling is False


def test_yaml_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("replay:\n  capacity: 5000\n  min_replay: 100\nrun:\n  max_seconds: 7\n")
    cfg = parse("--config", str(path))
    assert (cfg.replay.capacity, cfg.replay.min_replay, cfg.run.max_seconds) == (5000, 100, 7.0)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--actors", "0"], "actors=0 must be >= 1"),
        (["--capacity", "10", "--min-replay", "10"], "capacity=10 is below the batch size 64"),
        (["--gamma", "1.5"], "gamma=1.5"),
        (["--n-step", "0"], "n_step=0"),
        (["--redis-url", "localhost:6379"], "must start with redis://"),
        (["--device", "tpu"], "device='tpu'"),
    ],
)
def test_out_of_range_values_name_the_value(argv, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        parse(*argv)


def test_unknown_key_in_a_config_file_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[learner]\nbatchsize = 32\n")
    with pytest.raises(ConfigError, match="unknown key 'batchsize' in \\[learner\\].*batch_size"):
        parse("--config", str(path))


def test_unknown_section_and_bad_types(tmp_path):
    with pytest.raises(ConfigError, match="unknown section \\[leaner\\].*learner"):
        Config.from_dict({"leaner": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="expected an integer"):
        Config.from_dict({"actor": {"actors": "many"}})
    bad = tmp_path / "c.toml"
    bad.write_text("[actor\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        Config.from_file(bad)


def test_every_field_has_help_and_a_unique_flag():
    from common.config import iter_fields

    names = [f.name for _, f in iter_fields()]
    assert len(names) == len(set(names))
    assert all(f.metadata.get("help") for _, f in iter_fields())


def run_cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_lists_every_subcommand_and_flag():
    top = run_cli("--help")
    assert top.returncode == 0 and "train" in top.stdout and "evaluate" in top.stdout
    train = run_cli("train", "--help")
    for flag in (
        "--env",
        "--actors",
        "--envs-per-actor",
        "--redis-url",
        "--ray-address",
        "--max-seconds",
        "--max-frames",
        "--logdir",
        "--resume",
        "--config",
        "--summary-json",
        "--samples-per-insert",
    ):
        assert flag in train.stdout
    ev = run_cli("evaluate", "--help")
    for flag in ("--episodes", "--epsilon", "--video-dir"):
        assert flag in ev.stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "--env", "Pongg-v5"], "unknown game 'Pongg-v5'"),
        (["train", "--actors", "0"], "actors=0 must be >= 1"),
        (
            ["train", "--redis-url", "redis://127.0.0.1:1/0"],
            "cannot reach Redis at redis://127.0.0.1:1/0",
        ),
    ],
)
def test_cli_bad_input_fails_fast_with_a_clear_message(argv, fragment, tmp_path):
    res = run_cli(*argv, "--logdir", str(tmp_path / "run"))
    assert res.returncode == 2, res.stderr
    assert fragment in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_unreachable_ray_address(tmp_path, redis_url):
    res = run_cli(
        "train",
        "--ray-address",
        "127.0.0.1:1",
        "--redis-url",
        redis_url,
        "--logdir",
        str(tmp_path / "run"),
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "cannot reach Ray at '127.0.0.1:1'" in res.stderr
    assert "Traceback" not in res.stderr
