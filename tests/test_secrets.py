"""Secrets: a Redis password never lands in a file the run writes, in a message,
or in a process's argv. The URL comes from --redis-url, --redis-url-file or
$APEX_REDIS_URL; files and messages get it redacted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.config import Config, ConfigError
from common.redact import redact_text, redact_url, url_secrets
from deploy.cli import build_parser, config_from_args, main
from learner.checkpoint import load_checkpoint, save_checkpoint

SECRET = "s3cr3t-Pa55word-4f9c"
RAY_TOKEN = "ray-t0ken-9d2e7b1c5a"


@pytest.mark.parametrize(
    "url, shown",
    [
        (f"redis://:{SECRET}@10.0.0.5:6379/0", "redis://:***@10.0.0.5:6379/0"),
        (f"redis://apex:{SECRET}@Host.Example:6379", "redis://apex:***@Host.Example:6379"),
        (f"rediss://{SECRET}@h:1/2", "rediss://***@h:1/2"),
        (f"redis://h:1/0?password={SECRET}&db=1", "redis://h:1/0?password=***&db=1"),
        (f"unix://:{SECRET}@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        (f"redis://:{SECRET}@[::1]:6379/0", "redis://:***@[::1]:6379/0"),
        (
            f"redis://:{SECRET}@a:1/0,redis://:{SECRET}x@b:2/0",
            "redis://:***@a:1/0,redis://:***@b:2/0",
        ),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("", ""),
    ],
)
def test_redact_url(url, shown):
    assert redact_url(url) == shown
    assert SECRET not in redact_url(url)


def test_redact_text_scrubs_quoted_and_percent_encoded_passwords():
    url = "redis://:p%40ss%2Fword@h:1/0"
    assert set(url_secrets(url)) == {"p%40ss%2Fword", "p@ss/word"}
    msg = f"AUTH failed for p@ss/word at {url} and redis://u:other@h2:1"
    out = redact_text(msg, url)
    assert "p@ss" not in out and "p%40ss" not in out and "other" not in out


@pytest.fixture(autouse=True)
def no_url_in_env(monkeypatch):
    monkeypatch.delenv("APEX_REDIS_URL", raising=False)


def parse(*argv: str, warnings: list | None = None) -> Config:
    args = build_parser().parse_args(["train", *argv])
    return config_from_args(args, warn=(warnings if warnings is not None else []).append)


def test_url_sources_and_their_precedence(tmp_path, monkeypatch):
    env_url, file_url, flag_url = (f"redis://:{SECRET}@h{i}:1/0" for i in range(3))
    url_file = tmp_path / "url"
    url_file.write_text(f"\n  {file_url}  \n")
    url_file.chmod(0o600)
    assert parse().replay.redis_url == ""  # nothing given: embedded servers
    monkeypatch.setenv("APEX_REDIS_URL", env_url)
    assert parse().replay.redis_url == env_url
    assert parse("--redis-url-file", str(url_file)).replay.redis_url == file_url
    warnings: list[str] = []
    got = parse("--redis-url", flag_url, warnings=warnings)
    assert got.replay.redis_url == flag_url
    assert any("visible to every local user" in w and SECRET not in w for w in warnings)
    with pytest.raises(ConfigError, match="both redis_url and redis_url_file"):
        parse("--redis-url", flag_url, "--redis-url-file", str(url_file))


def test_url_file_checks(tmp_path):
    url_file = tmp_path / "url"
    with pytest.raises(ConfigError, match="cannot read --redis-url-file"):
        parse("--redis-url-file", str(url_file))
    url_file.write_text("redis://:a@h:1/0\nredis://:b@h:2/0\n")
    with pytest.raises(ConfigError, match="exactly one line"):
        parse("--redis-url-file", str(url_file))
    url_file.write_text(f"redis://:{SECRET}@h:1/0\n")
    url_file.chmod(0o644)
    warnings: list[str] = []
    parse("--redis-url-file", str(url_file), warnings=warnings)
    assert len(warnings) == 1 and "chmod 600" in warnings[0] and "mode 644" in warnings[0]
    assert SECRET not in warnings[0]
    url_file.chmod(0o600)
    warnings.clear()
    parse("--redis-url-file", str(url_file), warnings=warnings)
    assert warnings == []


def test_a_redacted_url_is_refused_with_what_to_do(capsys):
    assert main(["train", "--redis-url", "redis://:***@h:1/0"]) == 2
    err = capsys.readouterr().err
    assert "redacted password" in err and "APEX_REDIS_URL" in err


def test_bad_url_message_is_redacted(capsys):
    assert main(["train", "--redis-url", f"http://:{SECRET}@h:1"]) == 2
    err = capsys.readouterr().err
    assert "must start with redis://" in err and SECRET not in err


def test_config_json_and_messages_hold_no_password(tmp_path, capsys, monkeypatch):
    """The real `train` path up to the Redis check: config.json is written, then
    the unreachable Redis stops the run (exit 2) before Ray starts."""
    logdir = tmp_path / "run"
    monkeypatch.setenv("APEX_REDIS_URL", f"redis://:{SECRET}@127.0.0.1:1/0")
    rc = main(["train", "--env", "ApexCatch-v0", "--logdir", str(logdir)])
    out, err = capsys.readouterr()
    assert rc == 2 and "cannot reach Redis at redis://:***@127.0.0.1:1/0" in err, err
    assert SECRET not in out + err
    written = json.loads((logdir / "config.json").read_text())
    assert written["replay"]["redis_url"] == "redis://:***@127.0.0.1:1/0"
    assert_no_secret_under(logdir)


def test_checkpoint_config_holds_no_password(tmp_path):
    from learner.learner import Learner
    from tests.test_learner import make_cfg

    cfg = make_cfg()
    cfg.replay.redis_url = f"redis://:{SECRET}@h:1/0"
    learner = Learner(cfg, 3, "cpu")
    path = save_checkpoint(tmp_path / "c.pt", learner.state_dict(), {}, cfg.to_dict(), "x", 3)
    assert SECRET.encode() not in Path(path).read_bytes()
    assert load_checkpoint(path)["config"]["replay"]["redis_url"] == "redis://:***@h:1/0"
    assert cfg.replay.redis_url.endswith("@h:1/0") and SECRET in cfg.replay.redis_url


def assert_no_secret_under(root: Path, secret: str = SECRET) -> None:
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing under {root}"
    hits = [p for p in files if secret.encode() in p.read_bytes()]
    assert not hits, f"the secret is in {hits}"


def argv_holding(secret: str) -> list[str]:
    """Command lines of every process on this machine that contain ``secret``."""
    hits = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if secret.encode() in cmd:
                hits.append(f"{proc.name}: {cmd.decode(errors='replace')[:200]}")
    return hits


@pytest.mark.e2e  # ~25 s on an idle 2-core machine, 70-100 s under load
def test_training_run_leaves_the_password_nowhere(tmp_path):
    """A real `apex-dqn train` against a password-protected Redis, URL in
    $APEX_REDIS_URL, on a local Ray with token auth (as Ray 2.60 starts it by
    default): no file under LOGDIR, the summary, the Ray session logs,
    stdout/stderr or any process's argv holds the password or the Ray token, and
    the output says how to get the token."""
    from replay_server.redis_proc import EmbeddedRedis

    ray_tmp = Path(f"/tmp/apxs{os.getpid()}")  # Ray's socket paths must stay short
    logdir, summary = tmp_path / "run", tmp_path / "summary.json"
    token_file = tmp_path / "ray_token"
    token_file.write_text(RAY_TOKEN)
    token_file.chmod(0o644)  # as Ray writes it under umask 022; the run makes it private
    with EmbeddedRedis(str(tmp_path / "redis"), password=SECRET, appendonly=False) as server:
        env = {
            **os.environ,
            "APEX_REDIS_URL": server.url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
        }
        cmd = [sys.executable, "-m", "deploy.cli", "train", "--env", "ApexCatch-v0"]
        # stop on frames (some transitions went through the Redis), not on time: on a
        # loaded machine the actor may need many seconds to start
        cmd += ["--actors", "1", "--envs-per-actor", "2", "--max-frames", "1500"]
        cmd += ["--max-seconds", "150"]
        cmd += ["--min-replay", "64", "--capacity", "5000", "--checkpoint-minutes", "0.05"]
        cmd += ["--logdir", str(logdir), "--summary-json", str(summary)]
        seen: list[str] = []
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.5):
                seen.extend(argv_holding(SECRET))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        finally:
            done.set()
            watcher.join()
        try:
            assert res.returncode == 0, res.stderr[-3000:]
            assert json.loads(summary.read_text())["transitions"] > 0, res.stdout[-3000:]
            assert "run 'ray get-auth-token'" in res.stdout  # stdout is a pipe: no token
            assert token_file.stat().st_mode & 0o777 == 0o600
            for secret in (SECRET, RAY_TOKEN):
                assert secret not in res.stdout + res.stderr
                assert not seen, seen
                assert_no_secret_under(logdir, secret)
                assert_no_secret_under(summary, secret)
                assert_no_secret_under(ray_tmp, secret)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


def test_dashboard_lines_show_the_token_only_to_a_terminal(tmp_path, monkeypatch):
    from deploy.dashboard import dashboard_lines

    token_file = tmp_path / "t"
    token_file.write_text(f"  {RAY_TOKEN}\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert dashboard_lines("127.0.0.1:8265", tty=True) == [
        "[apex] Ray dashboard: http://127.0.0.1:8265"
    ]
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    piped = "\n".join(dashboard_lines("127.0.0.1:8265", tty=False))
    assert "ray get-auth-token" in piped and RAY_TOKEN not in piped
    shown = dashboard_lines("127.0.0.1:8265", tty=True)
    assert shown[-1].endswith(f": {RAY_TOKEN}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env-token")  # Ray's precedence: env first
    assert dashboard_lines("h:1", tty=True)[-1].endswith(": from-env-token")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert len(dashboard_lines("h:1", tty=True)) == 2  # no token found: the advice only


def test_ray_token_file_made_private(tmp_path, monkeypatch):
    from deploy.dashboard import restrict_token_file

    token_file = tmp_path / "auth_token"
    token_file.write_text(RAY_TOKEN)
    token_file.chmod(0o644)  # what Ray writes under umask 022
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert restrict_token_file() == str(token_file)
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert restrict_token_file() is None  # already private: nothing to do


@pytest.mark.slow
def test_the_launcher_starts_ray_so_its_token_file_is_private_from_the_start(tmp_path):
    """A real local Ray with token auth, started the launcher's way under the usual
    umask 022: Ray's token file is created 0600 (restrict_token_file finds
    nothing to narrow), not world-readable until a chmod after ray.init."""
    token = tmp_path / ".ray" / "auth_token"  # where Ray generates it (HOME is tmp_path)
    code = (
        "import os\n"
        "os.umask(0o022)\n"
        "import deploy.dashboard as d\n"
        "from common.config import Config\n"
        "from deploy import launcher\n"
        "calls = []\n"
        "real = d.restrict_token_file\n"
        "d.restrict_token_file = lambda: calls.append(real()) or calls[-1]\n"
        "cfg = Config()\n"
        "cfg.eval.eval_every_minutes = 0\n"
        "cfg.actor.actors = 1\n"
        "with launcher._ray(cfg, lambda line: None):\n"
        f"    mode = os.stat({str(token)!r}).st_mode & 0o777\n"
        "print('MODE', oct(mode), 'CHANGED', calls)\n"
    )
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "RAY_AUTH_MODE": "token",
    }
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "MODE 0o600 CHANGED [None]" in res.stdout, res.stdout + res.stderr[-2000:]
