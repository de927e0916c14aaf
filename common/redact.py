"""Keep secrets out of files, logs and messages.

A Redis URL may carry a password in two places that redis-py reads:
``redis://[user]:PASSWORD@host:port/db`` and a ``password=`` query argument
(``redis://host:6379/0?password=PASSWORD``). Every URL that is printed, logged
or written to a file (``config.json``, checkpoints, the summary) goes through
:func:`redact_url` first; free text that may quote a URL or a password (an
exception from redis-py, say) goes through :func:`scrub`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

REDACTED = "***"
_QUERY_SECRET = re.compile(r"(?i)([?&](?:password|pass|pwd)=)[^&#]*")


def _split(url: str) -> tuple[str, str, str] | None:
    """``scheme://``, the netloc and the rest (path, query, fragment); None when
    ``url`` has no ``scheme://``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if i != -1:
            end = min(end, i)
    return scheme + sep, rest[:end], rest[end:]


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``; everything else as written.

    ``redis://:pw@h:1/0`` -> ``redis://:***@h:1/0``; ``redis://user:pw@h`` ->
    ``redis://user:***@h``; userinfo without a colon (``redis://pw@h``, which
    redis-py sends as a username but people use as a password) -> ``***@h``;
    ``?password=pw`` -> ``?password=***``. Comma-separated lists (several
    shards) are redacted URL by URL.
    """
    if "," in url:
        return ",".join(redact_url(u) for u in url.split(","))
    parts = _split(url)
    if parts is None:
        return _QUERY_SECRET.sub(rf"\1{REDACTED}", url)
    head, netloc, rest = parts
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{hostport}" if colon else f"{REDACTED}@{hostport}"
    return head + netloc + _QUERY_SECRET.sub(rf"\1{REDACTED}", rest)


def url_secrets(url: str) -> list[str]:
    """The secrets a URL (or comma-separated URLs) carries, as written and
    percent-decoded; what :func:`scrub` must remove from text."""
    found: list[str] = []
    for one in url.split(","):
        parts = _split(one.strip())
        if parts is None:
            continue
        _, netloc, rest = parts
        if "@" in netloc:
            userinfo = netloc.rpartition("@")[0]
            user, colon, password = userinfo.partition(":")
            found.append(password if colon else user)
        found += [m.group(0).split("=", 1)[1] for m in _QUERY_SECRET.finditer(rest)]
    out: list[str] = []
    for s in found:
        for form in (s, unquote(s)):
            if form and form not in out:
                out.append(form)
    return out


def scrub(text: str, secrets: list[str] | tuple[str, ...]) -> str:
    """``text`` with every occurrence of each secret replaced by ``***``
    (longest first, so a secret that contains another goes whole)."""
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, REDACTED)
    return text


def redact_text(text: str, *urls: str) -> str:
    """``text`` with the secrets of ``urls`` scrubbed, then any URL-shaped
    password (``scheme://user:pw@``) in it redacted."""
    secrets = [s for u in urls for s in url_secrets(u)]
    text = scrub(text, secrets)
    return re.sub(r"(\w+://[^\s/@:]*):[^\s/@]*@", rf"\1:{REDACTED}@", text)
