"""A real Prometheus (Debian's ``prometheus`` package) watches a real training run.

One test, to share the run (~70-100 s here, most of it Ray and the run starting
and stopping):

1. ``apex-dqn train`` (Catch, one actor, evaluations every 6 s) starts a local Ray
   in a temp dir of its own; Ray writes its Prometheus config there
   (``session_latest/metrics/prometheus/prometheus.yml``, scraping the nodes listed
   in the file-SD json ``prom_metrics_service_discovery.json``).
2. Prometheus starts on loopback with that config, its scrape interval cut to 1 s
   (both files pass ``promtool check config``), and serves the console page
   ``deploy/prometheus/consoles/apex.html`` with Debian's console libraries.
3. The dashboard's template variables are evaluated as Grafana does
   (``label_values`` -> ``/api/v1/label/<label>/values``) and substituted into every
   panel query, which must return data through ``/api/v1/query_range``: a query
   without data fails the test, naming its panel. The one exception is asserted
   empty: Catch has no human score, so "Evaluation, human-normalized" has none.
4. The console page renders (HTTP 200 at ``/consoles/apex.html``) with one graph
   per panel and a value for every query in its table (but the human-normalized).
   With APEX_CONSOLE_SCREENSHOT=PATH, headless Chromium saves the page there
   (docs/img/console.png is taken so).
5. Ctrl-C (SIGINT) stops the run, which exits 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "apex-dqn.json"
CONSOLES = REPO / "deploy" / "prometheus" / "consoles"
# the console libraries (prom.lib, menu.lib) Debian's prometheus package ships as examples
CONSOLE_LIBRARIES = Path("/usr/share/doc/prometheus/examples/console_libraries")
SCRAPE = "1s"
RATE_INTERVAL = "10s"  # Grafana's $__rate_interval for a 1 s scrape (it takes >= 4 scrapes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def wait_for(cond: Callable[[], Any], timeout: float, what: str, run: subprocess.Popen, log: Path):
    """Poll ``cond`` until it returns something truthy; fail saying ``what`` on timeout
    or when the training run exits first (with the end of its log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if run.poll() is not None:
            pytest.fail(f"the run exited ({run.returncode}) before {what}:\n{tail(log)}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:g} s; the run's log ends:\n{tail(log)}")
        time.sleep(0.5)


def api(base: str, path: str, **params: Any) -> Any:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", (url, body)
    return body["data"]


def label_values(base: str, query: str) -> list[str]:
    """Grafana's ``label_values(selector, label)``, as its Prometheus data source asks."""
    found = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert found, f"not a label_values(selector, label) query: {query}"
    selector, label = found.groups()
    return api(base, f"label/{label}/values", **{"match[]": selector})


def substitute(expr: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, f"a variable left unsubstituted: {expr}"
    return expr


def scrape_config(ray_yml: Path, out: Path) -> Path:
    """Ray's generated config (its scrape jobs and file-SD targets, unchanged) with
    a 1 s scrape interval."""
    config = yaml.safe_load(ray_yml.read_text())
    assert config["scrape_configs"], f"no scrape job in {ray_yml}"
    config["global"] = {
        **config.get("global", {}),
        "scrape_interval": SCRAPE,
        "scrape_timeout": SCRAPE,
        "evaluation_interval": SCRAPE,
    }
    out.write_text(yaml.safe_dump(config))
    return out


def screenshot(url: str, out: Path) -> None:
    """A headless Chromium screenshot of ``url`` (the console page, its graphs drawn)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "APEX_CONSOLE_SCREENSHOT needs chromium (apt-get install chromium)"
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            *(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *("--virtual-time-budget=10000", "--window-size=1280,2600"),
            f"--screenshot={out}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and out.is_file(), done.stderr[-2000:]


@pytest.fixture
def prometheus_binaries() -> tuple[str, str]:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if not (prometheus and promtool):
        pytest.skip("needs Debian's prometheus package (apt-get install prometheus)")
    if not (CONSOLE_LIBRARIES / "prom.lib").is_file():
        pytest.skip(f"no prom.lib in {CONSOLE_LIBRARIES} (Debian's prometheus package)")
    return prometheus, promtool


def test_every_dashboard_query_returns_data_from_a_real_prometheus(
    tmp_path: Path, prometheus_binaries: tuple[str, str]
) -> None:
    prometheus, promtool = prometheus_binaries
    dash = json.loads(DASHBOARD.read_text())
    # Ray's temp dir of our own (short: Ray puts unix sockets under it), so that
    # session_latest is this run's, whatever else runs Ray on the machine
    ray_tmp = Path(tempfile.mkdtemp(prefix="apexprom-", dir="/tmp"))
    run_log, prom_log = tmp_path / "run.log", tmp_path / "prometheus.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        "RAY_TMPDIR": str(ray_tmp),
        # Ray sends a process's metrics to its node's exporter every 10 s by default
        "RAY_metrics_report_interval_ms": "1000",
    }
    argv = [
        *("train", "--env", "ApexCatch-v0", "--actors", "1", "--envs-per-actor", "4"),
        *("--network", "small", "--min-replay", "300", "--batch-size", "32"),
        *("--capacity", "5000", "--samples-per-insert", "4", "--loader-workers", "1"),
        *("--publish-seconds", "1", "--log-every", "2", "--eval-every-minutes", "0.1"),
        *("--eval-episodes", "2", "--eval-video-every", "0", "--max-seconds", "240"),
        *("--logdir", str(tmp_path / "run")),
    ]
    with open(run_log, "w") as out:
        run = subprocess.Popen(
            [sys.executable, "-m", "deploy.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )
    prom: subprocess.Popen | None = None
    try:
        # 1. Ray's scrape configuration for this session
        session = ray_tmp / "ray" / "session_latest"
        ray_yml = session / "metrics" / "prometheus" / "prometheus.yml"
        sd_file = wait_for(
            lambda: (
                ray_yml.is_file()
                and next(iter(yaml.safe_load(ray_yml.read_text())["scrape_configs"]), None)
            ),
            120,
            f"Ray's Prometheus config {ray_yml}",
            run,
            run_log,
        )["file_sd_configs"][0]["files"][0]
        assert Path(sd_file).resolve().parent == session.resolve(), sd_file
        wait_for(
            lambda: Path(sd_file).is_file(), 60, f"Ray's file-SD targets {sd_file}", run, run_log
        )
        config = scrape_config(ray_yml, tmp_path / "prometheus.yml")
        for path in (ray_yml, config):
            check = subprocess.run(
                [promtool, "check", "config", str(path)], capture_output=True, text=True
            )
            assert check.returncode == 0, (
                f"promtool check config {path}:\n{check.stdout}{check.stderr}"
            )

        # 2. Prometheus on loopback, serving the console page
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(prom_log, "w") as out:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    f"--web.console.templates={CONSOLES}",
                    f"--web.console.libraries={CONSOLE_LIBRARIES}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def ready() -> bool:
            if prom.poll() is not None:
                pytest.fail(f"prometheus exited ({prom.returncode}):\n{tail(prom_log)}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as r:
                    return r.status == 200
            return False

        wait_for(ready, 30, "Prometheus ready", run, run_log)
        start = time.time()

        # 3. the template variables, then every panel's queries
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        assert set(variables) == {"DS_PROMETHEUS", "Cluster", "SessionName"}
        cluster = variables["Cluster"]
        # no ray_io_cluster label on a local Ray: the query answers (nothing), All matches
        assert label_values(base, cluster["query"]["query"]) == []
        values = {"Cluster": cluster["allValue"], "__rate_interval": RATE_INTERVAL}
        sessions = wait_for(
            lambda: label_values(
                base, substitute(variables["SessionName"]["query"]["query"], values)
            ),
            60,
            "SessionName values (a Ray node metric)",
            run,
            run_log,
        )
        assert len(sessions) == 1 and sessions[0].startswith("session_"), sessions
        assert (ray_tmp / "ray" / sessions[0]).is_dir(), sessions
        values["SessionName"] = sessions[0]
        queries = [
            (p["title"], t["refId"], substitute(t["expr"], values))
            for p in dash["panels"]
            if p["type"] != "row"
            for t in p["targets"]
        ]
        # Catch is not an Atari game: it has no human score (common.atari_scores),
        # so its evaluations export no eval_human_normalized and that panel stays
        # empty, as it should; tests/test_dashboard.py's slow test reads the metric
        # back from a real node. Every other query must return data.
        no_human = [q for q in queries if "eval_human_normalized" in q[2]]
        assert [q[0] for q in no_human] == ["Evaluation, human-normalized"], no_human
        empty = [q for q in queries if q not in no_human]

        def all_have_data() -> bool:
            nonlocal empty
            now = time.time()
            empty = [
                q
                for q in empty
                if not api(base, "query_range", query=q[2], start=start, end=now, step=SCRAPE)[
                    "result"
                ]
            ]
            return not empty

        deadline = time.monotonic() + 150
        while not all_have_data() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        assert not empty, (
            "panel queries without data from a real Prometheus:\n"
            + "\n".join(f"  {title!r} ({ref}): {expr}" for title, ref, expr in empty)
            + f"\nthe run's log ends:\n{tail(run_log)}"
        )

        # 4. the console page, rendered by Prometheus with the variables as parameters
        page = f"{base}/consoles/apex.html?" + urllib.parse.urlencode(
            {"SessionName": values["SessionName"], "Cluster": values["Cluster"]}
        )
        with urllib.request.urlopen(page, timeout=30) as r:
            assert r.status == 200
            html = r.read().decode()
        panels = [p for p in dash["panels"] if p["type"] != "row"]
        assert html.count("new PromConsole.Graph(") == len(panels)
        for p in panels:
            assert f'<div id="panel-{p["id"]}"' in html, p["title"]
        drilldowns = re.findall(r'class="prom_query_drilldown"[^>]*>([^<]*)</a>', html)
        assert len(drilldowns) == len(queries), (len(drilldowns), len(queries))
        # a value for every query in the table but the human-normalized one ("-")
        assert [d.strip() for d in drilldowns].count("-") == len(no_human), drilldowns
        assert f">{values['SessionName']}</a>" in html  # the sessions list

        # the README's picture (docs/img/console.png), taken on request:
        # APEX_CONSOLE_SCREENSHOT=docs/img/console.png pytest tests/test_prometheus.py
        if shot := os.environ.get("APEX_CONSOLE_SCREENSHOT"):
            deadline = time.monotonic() + 90  # a minute and a half of curves first
            while run.poll() is None and time.monotonic() < deadline:
                time.sleep(1)
            # the graphs' time range (prom_console.js reads it from the URL's #pctc)
            span = urllib.parse.quote(json.dumps({"duration": 150, "endTime": 0}))
            screenshot(f"{page}#pctc{span}", Path(shot))

        # 5. Ctrl-C: the run stops cleanly
        run.send_signal(signal.SIGINT)
        assert run.wait(timeout=120) == 0, tail(run_log)
    finally:
        if prom is not None:
            prom.terminate()
            try:
                prom.wait(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.wait()
        if run.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)
