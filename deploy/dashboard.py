"""How to open the Ray dashboard, printed by ``apex-dqn train``.

Ray 2.60 turns token authentication on for a local ``ray.init()`` (unless
``RAY_AUTH_MODE`` says otherwise, it sets ``RAY_AUTH_MODE=token`` in the
driver's environment and writes a token to ``~/.ray/auth_token``); the dashboard
then opens on an "Authentication Token Required" prompt. `dashboard_lines` says
how to get the token (``ray get-auth-token``) and shows the token itself only
when ``tty`` is true, i.e. when the lines go to a terminal and not to a file or
a log.
"""

from __future__ import annotations

import os
from pathlib import Path


def token_auth_on() -> bool:
    """Whether this process runs Ray with token auth (read after ``ray.init``)."""
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def local_token() -> str | None:
    """The token Ray uses in this process, found the way Ray documents it:
    ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``; whitespace stripped; None when there is none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def restrict_token_file() -> str | None:
    """chmod 600 the token file Ray uses when others can read it (Ray 2.60 writes
    ``~/.ray/auth_token`` with the process umask, 0644 under the usual 022; the
    launcher starts Ray under umask 077, so this only narrows a file that an
    earlier ``ray start`` or another program wrote). Returns the path it changed,
    else None."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return None
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        st = path.stat()
        if st.st_uid != os.getuid() or not st.st_mode & 0o077:
            return None
        path.chmod(0o600)
    except OSError:
        return None
    return str(path)


def dashboard_lines(url: str, tty: bool) -> list[str]:
    """Lines telling the user how to open the dashboard at ``url`` (host:port)."""
    lines = [f"[apex] Ray dashboard: http://{url}"]
    if not token_auth_on():
        return lines
    lines.append(
        "[apex] it asks for Ray's auth token: run 'ray get-auth-token' on this machine "
        "and paste what it prints (RAY_AUTH_MODE=disabled turns token auth off)"
    )
    token = local_token() if tty else None
    if token:
        lines.append(f"[apex] token (shown because this is a terminal): {token}")
    return lines
