"""The Ape-X Grafana dashboard (deploy/grafana/) against the metrics the code exports.

Every metric a panel (or a template variable) queries must be one that
`learner.metrics.METRICS` names, exported by Ray as ``ray_apex_<name>``, so the
dashboard and the code cannot drift apart; the slow test records every name on a
real Ray node and reads them back from its Prometheus endpoint.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from learner.metrics import METRICS, Metrics

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "apex-dqn.json"
METRIC_RE = re.compile(r"\bray_apex_(\w+)")

# what the dashboard must show (issue 15): panel -> metrics it plots
REQUIRED = {
    "env frames/s": {"env_frames_per_s"},
    "updates/s": {"updates_per_s"},
    "replay size and bytes": {"replay_size", "replay_bytes"},
    "samples per insert": {"samples_per_insert"},
    "data wait": {"data_wait_fraction"},
    "training and evaluation returns": {"episode_return_mean", "eval_return_mean"},
    "weight-publish latency": {"publish_latency_s"},
    "actor and shard restarts": {"actor_restarts", "shard_restarts"},
    "replay outages": {"replay_outages", "replay_outage_s"},
}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def queried(dash: dict) -> set[str]:
    """Names after ``ray_apex_`` in every query: panel targets and template variables."""
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names |= set(METRIC_RE.findall(target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            names |= set(METRIC_RE.findall(json.dumps(var["query"])))
    return names


def test_every_queried_metric_is_one_the_code_exports():
    dash = load()
    names = queried(dash)
    unknown = sorted(names - set(METRICS))
    assert not unknown, f"dashboard queries metrics learner/metrics.py does not export: {unknown}"
    # nothing hides outside the panels' queries either (descriptions, links)
    assert set(METRIC_RE.findall(DASHBOARD.read_text())) <= set(METRICS)
    for what, wanted in REQUIRED.items():
        assert wanted <= names, f"no panel for {what}: {sorted(wanted - names)}"


def test_panels_are_well_formed():
    dash = load()
    assert dash["uid"] == "apex-dqn"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert '{SessionName=~"$SessionName"}' in t["expr"], t["expr"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "SessionName"} <= variables


def test_compose_provisions_the_dashboard_next_to_rays():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "metrics" in grafana["profiles"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in grafana["volumes"] if v.startswith("./"))
    target = mounts["./deploy/grafana"]
    provisioning = grafana["environment"]["GF_PATHS_PROVISIONING"]
    assert provisioning == f"{target}/provisioning"
    assert any(v == "./deploy/grafana:/etc/apex-grafana:ro" for v in grafana["volumes"])

    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    paths = {p["name"]: p["options"]["path"] for p in providers["providers"]}
    # Ray's generated dashboards, where Ray 2.60 writes them in the shared session dir
    assert paths["Ray"] == "/tmp/ray/session_latest/metrics/grafana/dashboards"
    assert any(v.endswith(":/tmp/ray:ro") for v in grafana["volumes"])
    # ours: the repository folder, as mounted
    assert paths["Ape-X"].startswith(target + "/")
    local = GRAFANA / paths["Ape-X"].removeprefix(target + "/")
    assert (local / DASHBOARD.name).is_file()

    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = sources["datasources"]
    head_env = compose["services"]["ray-head"]["environment"]
    assert source["type"] == "prometheus"
    assert source["url"] == head_env["RAY_PROMETHEUS_HOST"]


@pytest.mark.slow
def test_a_real_ray_node_exports_every_queried_metric(ray_local):
    """Record every METRICS name through `Metrics` (Ray gauges) and read the node's
    Prometheus endpoint: each name the dashboard queries is there as
    ``ray_apex_<name>{...,SessionName="..."}``. Takes ~10 s (Ray's report period)."""
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    m = Metrics(None, use_ray=True)
    m.record({name: float(i) + 0.5 for i, name in enumerate(METRICS)}, step=1)
    wanted = queried(load())
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not wanted <= seen:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            found = re.match(r"ray_apex_(\w+)\{[^}]*SessionName=\"[^\"]+\"[^}]*\} (\S+)$", line)
            if found and found.group(1) in METRICS:
                expected = float(list(METRICS).index(found.group(1))) + 0.5
                assert float(found.group(2)) == expected, line
                seen.add(found.group(1))
        time.sleep(1)
    m.close()
    assert wanted <= seen, f"not exported by Ray: {sorted(wanted - seen)}"
