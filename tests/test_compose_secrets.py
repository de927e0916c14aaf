"""deploy/compose-secrets.sh: the compose secret files (the Redis password and
Ray's auth token).

The script runs from a copy in a temporary "repository" (it works relative to
its own directory), so the real deploy/secrets is never touched. Runtime: < 1 s.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "deploy" / "compose-secrets.sh"


@pytest.fixture
def fake_repo(tmp_path) -> Path:
    (tmp_path / "deploy").mkdir()
    shutil.copy(SCRIPT, tmp_path / "deploy" / "compose-secrets.sh")
    return tmp_path


def run(repo: Path, **env: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        ["bash", str(repo / "deploy" / "compose-secrets.sh")],
        env={**base, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_creates_a_url_safe_password_once(fake_repo):
    res = run(fake_repo)
    assert res.returncode == 0, res.stderr
    secret = fake_repo / "deploy" / "secrets" / "redis_password"
    pw = secret.read_text()
    assert len(pw) == 32 and pw.replace("-", "").replace("_", "").isalnum(), pw
    assert mode(secret.parent) == 0o700 and mode(secret) == 0o644
    assert pw not in res.stdout + res.stderr, "the script printed the password"
    # Idempotent: kept, and modes repaired.
    secret.chmod(0o600)
    secret.parent.chmod(0o755)
    assert run(fake_repo).returncode == 0
    assert secret.read_text() == pw
    assert mode(secret.parent) == 0o700 and mode(secret) == 0o644


def test_rejects_a_bad_default_file_with_what_to_do(fake_repo):
    secret = fake_repo / "deploy" / "secrets" / "redis_password"
    secret.parent.mkdir(parents=True)
    for content, msg in (("", "is empty"), ("a/b@c\n", "other than letters")):
        secret.write_text(content)
        res = run(fake_repo)
        assert res.returncode == 2 and msg in res.stderr, res.stderr
    secret.unlink()
    secret.mkdir()  # what Docker leaves for a missing bind source
    res = run(fake_repo)
    assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr


def test_checks_a_file_given_in_redis_password_file(fake_repo, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    pw = mine / "pw"
    res = run(fake_repo, REDIS_PASSWORD_FILE=str(pw))
    assert res.returncode == 2 and "does not exist" in res.stderr, res.stderr
    assert not pw.exists(), "the script must not create a file it was pointed at"
    pw.write_text("Good-pass_1.~\n")
    pw.chmod(0o600)
    res = run(fake_repo, REDIS_PASSWORD_FILE=str(pw))
    assert res.returncode == 2 and "cannot read it; chmod 644" in res.stderr, res.stderr
    pw.chmod(0o644)
    res = run(fake_repo, REDIS_PASSWORD_FILE=str(pw))
    assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    mine.chmod(0o755)
    res = run(fake_repo, REDIS_PASSWORD_FILE=str(pw))
    assert res.returncode == 0 and "other users of this host can read" in res.stderr
    # .env's value, as compose would read it, when the environment has none.
    (fake_repo / ".env").write_text(f'REDIS_PASSWORD_FILE="{pw}"\n')
    res = run(fake_repo)
    assert res.returncode == 0 and str(pw) in res.stderr, res.stderr
    assert not (fake_repo / "deploy" / "secrets" / "redis_password").exists()


def test_creates_a_ray_token_once_and_checks_one_given(fake_repo, tmp_path):
    res = run(fake_repo)
    assert res.returncode == 0, res.stderr
    token = fake_repo / "deploy" / "secrets" / "ray_auth_token"
    value = token.read_text()
    assert len(value) == 64 and int(value, 16) >= 0, value  # 32 random bytes, hex
    assert mode(token) == 0o644 and mode(token.parent) == 0o700
    assert value not in res.stdout + res.stderr, "the script printed the token"
    assert run(fake_repo).returncode == 0 and token.read_text() == value  # kept
    token.write_text("has space\n")
    res = run(fake_repo)
    assert res.returncode == 2 and "other than letters" in res.stderr, res.stderr
    token.unlink()
    mine = tmp_path / "tok"
    res = run(fake_repo, RAY_AUTH_TOKEN_FILE=str(mine))
    assert res.returncode == 2 and f"RAY_AUTH_TOKEN_FILE={mine} does not exist" in res.stderr
    assert not mine.exists() and not token.exists()
