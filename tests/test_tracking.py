"""``--track wandb`` (`learner.tracking`): TensorBoard scalars and evaluations synced
to a real Weights & Biases run in offline mode, read back from the run's own file;
nothing sent over the network; no secret of ours in any file; a clear error when
wandb is not installed.

The network checks are real: every proxy variable and ``WANDB_BASE_URL`` point at
a listener of this test that counts connections (wandb-core, a Go binary, honours
the proxy variables; a connection there would be an upload or a lookup attempt),
and an audit hook in the training process records every socket connect or name
lookup that is not local.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common.config import Config
from deploy.cli import main
from learner import tracking

REPO = Path(__file__).resolve().parent.parent
API_KEY = "apexdqntestkey" + "0" * 26  # 40 characters, like a real W&B key
needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None,
    reason="the wandb extra is not installed: pip install 'apex-dqn[wandb]'",
)


class Listener:
    """A TCP listener on 127.0.0.1 that accepts and counts connections."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(1.0)
                try:
                    self.connections.append(conn.recv(200))
                except OSError:
                    self.connections.append(b"")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def offline_env(tmp_path):
    """The environment of an offline W&B run that cannot reach anything: WANDB_DIR,
    its config/cache dirs and HOME under tmp_path, a (fake) API key to look for
    afterwards, every proxy and the W&B URL pointing at a counting `Listener`."""
    listener = Listener()
    dead = f"http://127.0.0.1:{listener.port}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("WANDB_", "NO_PROXY"))}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp_path / "wandb"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_API_KEY=API_KEY,
        WANDB_BASE_URL=dead,
        HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
    )
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = env[name.upper()] = dead
    (tmp_path / "home").mkdir()
    yield env, listener
    listener.close()


# ---- reading the offline run's file (run-<id>.wandb) -------------------------------
# A LevelDB-style log (what `wandb sync` uploads): a 7-byte file header (":W&B",
# magic, version), then 32 KiB blocks of records, each with a 7-byte header (crc32,
# length, type: 1 full, 2 first, 3 middle, 4 last piece), each payload one
# protobuf `Record` of wandb's own schema.
BLOCK = 32 * 1024


def wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, payloads, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            payloads.append(pending + chunk)
    return [pb.Record.FromString(p) for p in payloads]


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def read_run(wandb_dir: Path) -> dict:
    """The one offline run under ``wandb_dir``: its directory, history rows, final
    summary, config and exit code."""
    runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run in {wandb_dir}, found {runs}"
    (run_file,) = runs[0].glob("run-*.wandb")
    out: dict = {"dir": runs[0], "history": [], "summary": {}, "config": {}, "exit": None}
    for rec in wandb_records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append(_items(rec.history.item))
        elif kind == "summary":
            out["summary"].update(_items(rec.summary.update))
        elif kind == "run":
            out["config"].update(_items(rec.run.config.update))
        elif kind == "config":
            out["config"].update(_items(rec.config.update))
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path}: {n}" for n in needles if n.encode() in data]
    return found


# The training side of the fast test, in its own process: wandb patches
# TensorBoard and starts a service process, state that must not leak into pytest.
CHILD = r"""
import json, os, sys
from pathlib import Path

LOCAL = {"127.0.0.1", "::1", "localhost", "", None}
outside = []

def audit(event, args):
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in LOCAL:
        outside.append(f"connect {args[1]!r}")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if host not in LOCAL:
            outside.append(f"lookup {host}")

sys.addaudithook(audit)
# a password on the command line: wandb's system metadata would record it
sys.argv = ["apex-dqn", "train", "--redis-url", "redis://:ARGV-PASSWORD@127.0.0.1:6390"]
from common.config import Config
from learner import tracking
from learner.metrics import Metrics

logdir = Path(os.environ["APEX_TEST_LOGDIR"])
cfg = Config()
cfg.run.track, cfg.run.logdir = "wandb", str(logdir)
cfg.replay.redis_url = "redis://:CONFIG-PASSWORD@127.0.0.1:6390"
lines = []
with tracking.start(cfg, logdir, out=lines.append) as tracker:
    metrics = Metrics(str(logdir / "tb"))  # the training loop's own TensorBoard writer
    metrics.record({"loss": 0.25, "updates_per_s": 12.5}, step=1000)
    # what learner.evaluator records for each evaluation
    metrics.record({"eval_return_mean": 17.5, "eval_return_median": 18.0}, step=2000)
    metrics.close()
    (logdir / "evals.jsonl").write_text(json.dumps({"index": 0, "eval_return_mean": 17.5}) + "\n")
    tracker.finish({"best_eval_return_mean": 17.5, "evaluations": 1, "recent_returns": [1.0]})
print("RESULT " + json.dumps({"outside": outside, "lines": lines}))
"""


@needs_wandb
def test_offline_run_holds_the_scalars_and_evaluations_and_touches_no_network(
    tmp_path, offline_env
):
    env, listener = offline_env
    logdir = tmp_path / "run"
    logdir.mkdir()
    res = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "APEX_TEST_LOGDIR": str(logdir)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT ", 1)[1])
    assert result["outside"] == []  # no socket or name lookup beyond this machine
    assert listener.connections == []  # wandb-core made no HTTP(S) request through a proxy
    assert "offline" in result["lines"][0] and "wandb sync" in result["lines"][0]

    run = read_run(tmp_path / "wandb")
    by_step = {row["global_step"]: row for row in run["history"] if "global_step" in row}
    assert by_step[1000]["loss"] == 0.25 and by_step[1000]["updates_per_s"] == 12.5
    assert by_step[2000]["eval_return_mean"] == 17.5
    assert by_step[2000]["eval_return_median"] == 18.0
    assert run["summary"]["best_eval_return_mean"] == 17.5
    assert run["summary"]["evaluations"] == 1
    assert "recent_returns" not in run["summary"]  # lists stay in the summary JSON
    assert run["exit"] == 0
    replay = run["config"]["replay"]
    assert replay["redis_url"] == "redis://:***@127.0.0.1:6390"  # Config.to_dict's redaction
    assert run["config"]["run"]["track"] == "wandb"
    saved = run["dir"] / "files" / "evals.jsonl"
    assert json.loads(saved.read_text())["eval_return_mean"] == 17.5

    # the API key came from the environment and went nowhere; no password either
    assert files_containing(tmp_path, [API_KEY, "ARGV-PASSWORD", "CONFIG-PASSWORD"]) == []


@needs_wandb
def test_online_without_an_api_key_stops_before_anything_starts(tmp_path, offline_env):
    env, listener = offline_env
    del env["WANDB_API_KEY"]  # and HOME is empty: no netrc, no `wandb login`
    logdir = tmp_path / "run"
    argv = ["train", "--track", "wandb", "--wandb-mode", "online", "--env", "ApexCatch-v0"]
    res = subprocess.run(
        [sys.executable, "-m", "deploy.cli", *argv, "--logdir", str(logdir)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "--track wandb: W&B did not start" in res.stderr
    assert "'wandb login'" in res.stderr and "--wandb-mode offline" in res.stderr
    assert "[apex] embedded" not in res.stdout  # no redis-server, no Ray: nothing started
    assert not (logdir / "tb").exists()
    assert listener.connections == []


def test_track_wandb_without_wandb_says_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if absent
    logdir = tmp_path / "run"
    for extra in ([], ["--check"]):
        argv = ["train", "--track", "wandb", "--env", "ApexCatch-v0", "--logdir", str(logdir)]
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err
        assert "--track wandb needs the wandb package" in err
        assert "pip install 'apex-dqn[wandb]'" in err
    assert not logdir.exists()  # stopped before anything started or was written

    cfg = Config()
    cfg.run.track, cfg.run.logdir = "wandb", str(logdir)
    from deploy.launcher import train

    with pytest.raises(tracking.TrackingError, match=r"apex-dqn\[wandb\]"):
        train(cfg)
    assert not logdir.exists()

    cfg.run.track = "none"  # the default needs no wandb: a tracker that does nothing
    with tracking.start(cfg, logdir) as tracker:
        assert tracker.run is None
        tracker.finish({"updates": 1})
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--track", "neptune", "--check"])
    assert exit_.value.code == 2
    assert "invalid choice: 'neptune'" in capsys.readouterr().err


@needs_wandb
@pytest.mark.slow
def test_in_process_training_tracked_offline(tmp_path, offline_env, monkeypatch):
    """The launcher's hook: a whole (tiny) training with ``--track wandb``; the
    run's own TensorBoard scalars and its final evaluation reach the W&B run."""
    from tests.test_in_process import CATCH
    from tests.test_train_e2e import cli

    env, listener = offline_env
    for key in [k for k in os.environ if k.upper().startswith(("WANDB_", "NO_PROXY"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    logdir = tmp_path / "catch"
    res = cli(
        *CATCH,
        *("--min-replay", "300", "--max-updates", "30", "--max-seconds", "300"),
        *("--eval-every-minutes", "600", "--eval-episodes", "2", "--log-every", "5"),
        *("--logdir", str(logdir), "--track", "wandb"),
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[apex] tracking: W&B run catch, offline" in res.stdout
    run = read_run(tmp_path / "wandb")
    keys = {k for row in run["history"] for k in row}
    assert {"loss", "updates_per_s", "replay_size", "eval_return_mean"} <= keys
    assert run["summary"]["updates"] == 30 and run["summary"]["evaluations"] == 1
    assert run["summary"]["stop_reason"] == "max_updates=30 reached"
    assert run["exit"] == 0
    assert (run["dir"] / "files" / "evals.jsonl").is_file()
    assert listener.connections == []
    assert files_containing(tmp_path, [API_KEY]) == []
