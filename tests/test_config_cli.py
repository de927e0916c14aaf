"""Config validation and the CLI's handling of bad input (no Ray, no Redis needed)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from common.config import Config, ConfigError
from deploy.cli import build_parser, config_from_args, main


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
        (["--actors", "0"], "actors=0 must be in [1, 10_000]"),
        (["--capacity", "10", "--min-replay", "10"], "capacity=10 is below the batch size 32"),
        (["--gamma", "1.5"], "gamma=1.5"),
        (["--n-step", "0"], "n_step=0"),
        (["--redis-url", "localhost:6379"], "must start with redis://"),
        (["--device", "tpu"], "device='tpu'"),
    ],
)
def test_out_of_range_values_name_the_value(argv, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse(*argv)


# The issue's list: each must stop with exit 2 and name the flag and its range.
BAD_FLAGS = [
    (["--seed", "-1"], "seed=-1 must be in [0, 2_147_483_647]", "--seed"),
    (["--samples-per-insert", "inf"], "samples_per_insert=inf must be a finite number", "--samples-per-insert"),
    (["--lr", "inf"], "lr=inf must be a finite number in (0, 1] or 0", "--lr"),
    (["--lr", "nan"], "lr=nan must be a finite number", "--lr"),
    (["--capacity", "1e13"], "capacity=10000000000000 must be in [1, 1_000_000_000]", "--capacity"),
    (["--checkpoint-minutes", "inf"], "checkpoint_minutes=inf must be a finite number", "--checkpoint-minutes"),
    (["--prefetch", "100000"], "prefetch=100000 must be in [1, 64]", "--prefetch"),
    (["--local-buffer-mb", "1e12"], "local_buffer_mb=1000000000000.0 must be in [0.01, 65_536]", "--local-buffer-mb"),
    (["--shards", "500"], "shards=500 must be in [1, 64]", "--shards"),
    (["--device", "cuda:abc"], "device='cuda:abc'", "cuda:N"),
    (["--eps-alpha", "inf"], "eps_alpha=inf must be a finite number in [0, 100]", "--eps-alpha"),
    (["--gamma", "0"], "gamma=0.0 must be in (0, 1]", "--gamma"),
    (["--max-frames", "1e30"], "max_frames=", "--max-frames"),
    (["--data-dir", 'runs/a"b'], "data_dir='runs/a\"b' contains '\"'", "configuration"),
    (["--data-dir", "runs/a\nsave 1 1"], "contains '\\n'", "configuration"),
    (["--logdir", "runs/x'\ndir /etc"], "contains '\\n', \"'\"", "configuration"),
    (["--summary-json", "out\x00.json"], "control characters", "summary_json"),
]  # fmt: skip


@pytest.mark.parametrize("argv, fragment, fix", BAD_FLAGS, ids=lambda v: str(v)[:40])
def test_issue_flags_exit_2_with_what_to_fix(argv, fragment, fix, capsys):
    """Through the real CLI entry point: exit 2 before anything starts."""
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and fix in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["--capacity", "2e6"], ("replay", "capacity", 2_000_000)),
        (["--device", "cuda:1"], ("learner", "device", "cuda:1")),
        (["--seed", str(2**31 - 1)], ("run", "seed", 2**31 - 1)),
        (["--samples-per-insert", "0"], ("replay", "samples_per_insert", 0.0)),
        (["--sticky-actions", "-1"], ("env", "sticky_actions", -1.0)),
        (["--logdir", "runs/my run (2)"], ("run", "logdir", "runs/my run (2)")),
    ],
)
def test_values_a_user_could_want_are_accepted(argv, expect):
    section, name, value = expect
    assert getattr(getattr(parse(*argv), section), name) == value


def test_every_number_has_a_stated_range():
    from common.config import BOUNDS, field_type, iter_fields

    numeric = {f.name for s, f in iter_fields() if field_type(s, f.name) in (int, float)}
    assert numeric == set(BOUNDS), numeric ^ set(BOUNDS)
    assert all(b.why and b.lo <= b.hi for b in BOUNDS.values())
    # the defaults themselves are in range
    Config().validate()


def test_range_is_checked_for_config_files_too(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[replay]\nprefetch = 1_000_000\n")
    with pytest.raises(ConfigError, match=re.escape("prefetch=1000000 must be in [1, 64]")):
        parse("--config", str(path))
    path.write_text("[learner]\nlr = inf\n")
    with pytest.raises(ConfigError, match="lr=inf must be a finite number"):
        parse("--config", str(path))


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
        (["train", "--actors", "0"], "actors=0 must be in [1, 10_000]"),
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


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--seed", "-1"], "--seed=-1 must be in [0, 2147483640]"),
        (["--seed", str(2**31)], "--seed=2147483648 must be in"),
        (["--episodes", "0"], "--episodes=0 must be in [1, 1_000_000]"),
        (["--epsilon", "nan"], "--epsilon=nan must be in [0, 1]"),
    ],
)
def test_evaluate_bad_numbers_exit_2(argv, fragment, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "none.pt"), *argv]) == 2
    assert fragment in capsys.readouterr().err
