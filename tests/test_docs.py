"""The README and docs/ stay honest: short README, the Quickstart's two commands,
links and anchors that resolve, `apex-dqn train` examples that the real parser
accepts, and file paths that exist. Plain file reads and argparse: no Ray, Redis
or env, well under a second."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target); the target ends at whitespace or ")"
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
EXTERNAL = ("http://", "https://", "mailto:")
# repository paths mentioned in prose, tables or code: configs/X.toml, bench/X.py,
# deploy/X, and the Python modules and tests the docs point readers at
REPO_PATH = re.compile(
    r"(?<![\w./~-])("
    r"configs/[\w.-]+\.toml"
    r"|bench/[\w.-]+\.py"
    r"|deploy/[\w.-][\w./-]*"
    r"|(?:tests|common|learner|actors|replay_server)/[\w.-]+\.py"
    r")"
)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _split(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str, list[str]]]]:
    """(prose lines, fenced blocks) of a markdown file: prose as (lineno, text),
    blocks as (first lineno, info string, lines)."""
    prose: list[tuple[int, str]] = []
    blocks: list[tuple[int, str, list[str]]] = []
    block: tuple[int, str, list[str]] | None = None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            if block is None:
                block = (n, line.strip().lstrip("`~").strip(), [])
            else:
                blocks.append(block)
                block = None
            continue
        if block is None:
            prose.append((n, line))
        else:
            block[2].append(line)
    assert block is None, f"{_rel(path)}: a code block opened at line {block[0]} never closes"
    return prose, blocks


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, inline markup and punctuation
    dropped (word characters, hyphens and spaces kept), spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, duplicates numbered as GitHub does."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in _split(path)[0]:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(lineno, target) of every markdown link and image outside code blocks and
    inline code."""
    out = []
    for n, line in _split(path)[0]:
        line = re.sub(r"(`+)(.+?)\1", "", line)  # inline code spans
        out += [(n, m.group(1)) for m in LINK.finditer(line)]
    return out


def bash_commands(path: Path) -> list[tuple[int, str]]:
    """(lineno, command) per command line of the file's ```bash blocks, with
    backslash continuations joined."""
    out = []
    for first, info, lines in _split(path)[1]:
        if info.split()[:1] != ["bash"]:
            continue
        pending, start = "", 0
        for i, line in enumerate(lines):
            if not pending:
                start = first + 1 + i
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            out.append((start, pending + line))
            pending = ""
        if pending:
            out.append((start, pending))
    return out


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move details to docs/"
    )


def test_quickstart_has_the_two_commands():
    prose, blocks = _split(README)
    start = next((n for n, line in prose if line.strip() == "## Quickstart"), None)
    assert start is not None, "README.md has no '## Quickstart' section"
    after = [b for b in blocks if b[0] > start]
    assert after and after[0][1] == "bash", "the Quickstart has no ```bash block"
    commands = [
        line.split("#", 1)[0].strip() for line in after[0][2] if line.split("#", 1)[0].strip()
    ]
    assert commands == ["bash deploy/train.sh", "bash deploy/test.sh"], (
        f"the Quickstart block holds {commands}, not exactly "
        "'bash deploy/train.sh' and 'bash deploy/test.sh'"
    )
    missing = [c.split()[1] for c in commands if not (ROOT / c.split()[1]).is_file()]
    assert not missing, f"the Quickstart runs scripts that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_anchors_resolve(page: Path):
    broken = []
    for n, target in links(page):
        if target.startswith(EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        where = f"{_rel(page)}:{n}: {target}"
        if not dest.exists():
            broken.append(f"{where} (no such file)")
            continue
        if anchor:
            if dest.suffix != ".md":
                broken.append(f"{where} (an anchor into a non-markdown file)")
            elif anchor not in anchors(dest):
                broken.append(f"{where} (no heading with anchor #{anchor} in {dest.name})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_files_link_back_to_readme():
    missing = [
        _rel(p) for p in DOCS if "../README.md" not in {t.partition("#")[0] for _, t in links(p)}
    ]
    assert not missing, f"docs files without a link back to README.md: {missing}"


def test_train_examples_parse():
    from deploy.cli import build_parser

    checked, bad = 0, []
    for page in PAGES:
        for n, line in bash_commands(page):
            text = line.strip()
            text = text.removeprefix(".venv/bin/")
            if not text.startswith("apex-dqn train"):
                continue
            if any(s in text for s in ("...", "<", "$")):
                continue
            where = f"{_rel(page)}:{n}: {text}"
            try:
                argv = shlex.split(text, comments=True)[1:]
            except ValueError as exc:
                bad.append(f"{where} (does not split: {exc})")
                continue
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    build_parser().parse_args(argv)
            except SystemExit as exc:
                if exc.code not in (0, None):  # --help exits 0
                    msg = err.getvalue().strip().splitlines()
                    bad.append(f"{where} ({msg[-1] if msg else f'exit {exc.code}'})")
            checked += 1
    assert checked, "no `apex-dqn train` example found in any ```bash block"
    assert not bad, "examples the CLI parser refuses:\n" + "\n".join(bad)


# paths a script writes in a checkout (git-ignored), never committed: the path ->
# the script that writes it
GENERATED = {"deploy/secrets": "deploy/compose-secrets.sh"}


def test_mentioned_paths_exist():
    for prefix, script in GENERATED.items():
        assert prefix in (ROOT / script).read_text(), (prefix, script)
        assert f"/{prefix}/" in (ROOT / ".gitignore").read_text(), prefix
    missing = []
    for page in PAGES:
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for m in REPO_PATH.finditer(line):
                path = m.group(1).rstrip(".")
                if path.rstrip("/").startswith(tuple(GENERATED)):
                    continue
                if not (ROOT / path).exists():
                    missing.append(f"{_rel(page)}:{n}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(missing)
