"""The Ape-X Grafana dashboard (deploy/grafana/) against the metrics the code exports.

Every metric a panel queries must be one that `learner.metrics.METRICS` names,
under its Prometheus name (`learner.metrics.prometheus_name`, exported by Ray
with its ``ray_`` prefix: ``ray_apex_<name>`` gauges, ``ray_apex_<name>_total``
counters), so the dashboard and the code cannot drift apart; the slow test records
every name on a real Ray node and reads them back from its Prometheus endpoint.
tests/test_prometheus.py has a real Prometheus evaluate every query during a run.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import yaml

from deploy.prometheus import console
from learner.metrics import COUNTERS, METRICS, Metrics, prometheus_name

REPO = Path(__file__).resolve().parent.parent
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "apex-dqn.json"
METRIC_RE = re.compile(r"\bray_(apex_\w+)")
# Prometheus name (without Ray's ray_ prefix) -> METRICS name
EXPORTED = {prometheus_name(name): name for name in METRICS}
FILTER = '{SessionName=~"$SessionName",ray_io_cluster=~"$Cluster"}'
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
RAY_DASHBOARDS = Path(ray.__file__).parent / "dashboard" / "modules" / "metrics" / "dashboards"

# what the dashboard must show (issue 15): panel -> metrics it plots
REQUIRED = {
    "env frames/s": {"env_frames_per_s", "env_frames"},
    "updates/s": {"updates_per_s", "updates"},
    "replay size and bytes": {"replay_size", "replay_bytes"},
    "samples per insert": {"samples_per_insert"},
    "data wait": {"data_wait_fraction"},
    "training and evaluation returns": {"episode_return_mean", "eval_return_mean"},
    "weight-publish latency": {"publish_latency_s"},
    "actor and shard restarts": {"actor_restarts", "shard_restarts"},
    "replay outages": {"replay_outages", "replay_outage_s"},
    "episodes": {"episodes"},
}


def load() -> dict:
    return json.loads(DASHBOARD.read_text())


def exported_names(text: str) -> set[str]:
    """The Prometheus names after ``ray_`` of our metrics (``apex_...``) in ``text``."""
    return set(METRIC_RE.findall(text))


def queried(dash: dict) -> set[str]:
    """METRICS names of every ``ray_apex_*`` query: panel targets and template variables
    (a name the code does not export raises KeyError, naming it)."""
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            names |= exported_names(target["expr"])
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            names |= exported_names(json.dumps(var["query"]))
    unknown = sorted(names - set(EXPORTED))
    assert not unknown, f"dashboard queries metrics learner/metrics.py does not export: {unknown}"
    return {EXPORTED[n] for n in names}


def test_prometheus_names():
    assert prometheus_name("env_frames") == "apex_env_frames_total"
    assert prometheus_name("replay_outage_s") == "apex_replay_outage_seconds_total"
    assert prometheus_name("publish_latency_s") == "apex_publish_latency_seconds"
    assert prometheus_name("updates_per_s") == "apex_updates_per_second"
    assert prometheus_name("loss") == "apex_loss"
    assert len(EXPORTED) == len(METRICS)  # one Prometheus name per metric
    for name in COUNTERS:
        assert name in METRICS and prometheus_name(name).endswith("_total"), name
    for name in set(METRICS) - COUNTERS:
        assert not prometheus_name(name).endswith("_total"), name
    # a Prometheus name holds seconds, never a bare _s
    assert not [n for n in EXPORTED if re.search(r"_s(_total)?$", n)]
    with pytest.raises(ValueError, match="unknown metric 'lose'"):
        prometheus_name("lose")


def test_every_queried_metric_is_one_the_code_exports():
    dash = load()
    names = queried(dash)
    # nothing hides outside the panels' queries either (descriptions, links)
    assert exported_names(DASHBOARD.read_text()) <= set(EXPORTED)
    for what, wanted in REQUIRED.items():
        assert wanted <= names, f"no panel for {what}: {sorted(wanted - names)}"
    # a counter is read through rate()/increase() or as a count, a gauge never is
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            for metric in re.findall(r"\b(?:rate|increase|irate)\(ray_(apex_\w+)", t["expr"]):
                assert EXPORTED[metric] in COUNTERS, (panel["title"], t["expr"])


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
        assert p["datasource"] == DATASOURCE, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            # every metric filtered by session and cluster, as Ray's own dashboards do
            metrics = re.findall(r"\bray_apex_\w+", t["expr"])
            assert metrics, t["expr"]
            assert len(metrics) == len(re.findall(r"\bray_apex_\w+" + re.escape(FILTER), t["expr"]))
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_import_asks_for_the_data_source_and_provisioning_finds_one():
    """``__inputs`` makes Grafana's Import screen ask for the Prometheus data source
    (it replaces ``${DS_PROMETHEUS}`` with the one picked); a file-provisioned copy
    skips ``__inputs``, and there a data-source variable of the same name resolves
    ``${DS_PROMETHEUS}`` to the default Prometheus."""
    dash = load()
    (source,) = dash["__inputs"]
    assert source == {
        **source,
        "name": "DS_PROMETHEUS",
        "type": "datasource",
        "pluginId": "prometheus",
    }
    assert {"type": "datasource", "id": "prometheus"}.items() <= dash["__requires"][1].items()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["DS_PROMETHEUS", "Cluster", "SessionName"]
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    for name in ("Cluster", "SessionName"):
        assert variables[name]["datasource"] == DATASOURCE
    # the only data source anywhere is the input (nothing left from the old variable)
    text = DASHBOARD.read_text()
    assert "${datasource}" not in text
    uids = set(re.findall(r'"uid": "([^"]*)"', text)) - {dash["uid"]}
    assert uids == {"${DS_PROMETHEUS}"}


def test_cluster_and_session_variables_are_rays():
    """`Cluster` and `SessionName` as in the dashboards Ray generates (its label
    ``ray_io_cluster``, a metric every Ray node exports from its start, so a run shows
    up before learning does); our SessionName is filtered by the cluster."""
    ray_vars = {
        v["name"]: v
        for v in json.loads((RAY_DASHBOARDS / "default_grafana_dashboard_base.json").read_text())[
            "templating"
        ]["list"]
    }
    ours = {v["name"]: v for v in load()["templating"]["list"]}
    assert ray_vars["Cluster"]["allValue"] == ours["Cluster"]["allValue"] == ".*"
    ray_query = ray_vars["Cluster"]["query"]["query"].replace("{{{global_filters}}}", "")
    assert ours["Cluster"]["query"]["query"] == ray_query
    ray_session = ray_vars["SessionName"]["query"]["query"].replace("{{{global_filters}}}", "")
    metric = re.fullmatch(r"label_values\((\w+), SessionName\)", ray_session).group(1)
    assert ours["SessionName"]["query"]["query"] == (
        f'label_values({metric}{{ray_io_cluster=~"$Cluster"}}, SessionName)'
    )
    assert ours["SessionName"]["allValue"] == ".+" and ours["SessionName"]["includeAll"]
    # the dashboard's own queries use Ray's filter labels
    panels = (RAY_DASHBOARDS / "default_dashboard_panels.py").read_text()
    assert 'SessionName=~"$SessionName"' in panels and 'ray_io_cluster=~"$Cluster"' in panels


def test_the_console_page_is_the_dashboards():
    """deploy/prometheus/consoles/apex.html is what `python -m deploy.prometheus.console`
    writes from the dashboard now: one graph per panel, with that panel's queries."""
    dash = load()
    page = console.CONSOLE.read_text()
    assert page == console.render(dash), "stale: run python -m deploy.prometheus.console"
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert page.count("new PromConsole.Graph(") == len(panels)
    for p in panels:
        graph = page.split(f'<div id="panel-{p["id"]}"', 1)[1].split("</script>", 1)[0]
        exprs = [json.loads(e) for e in re.findall(r'apexQuery\(("(?:[^"\\]|\\.)*")\)', graph)]
        assert exprs == [t["expr"] for t in p["targets"]], p["title"]


def test_compose_provisions_the_dashboard_next_to_rays():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    grafana = compose["services"]["grafana"]
    assert "grafana" in grafana["profiles"]  # optional: its image needs a registry
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
    """Record every METRICS name through `Metrics` (Ray gauges and counters) and read
    the node's Prometheus endpoint: each name the dashboard queries is there as
    ``ray_<prometheus name>{...,SessionName="..."}``, a gauge with its value, a
    counter with what this process added (a total recorded lower is not exported
    backwards; `count_from` starts a resumed total). Takes ~10 s (Ray's report period)."""
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    m = Metrics(None, use_ray=True)
    m.count_from({"updates": 1000})  # a resumed run's checkpoint held 1,000 updates
    first = {name: float(i) + 0.5 for i, name in enumerate(METRICS)}
    first["updates"] = 1000 + first["updates"]
    m.record(first, step=1)
    m.record({"env_frames": first["env_frames"] + 100}, step=2)
    m.record({"env_frames": first["env_frames"] + 40}, step=3)  # lower: the counter holds
    expected = {name: float(i) + 0.5 for i, name in enumerate(METRICS)}
    expected["env_frames"] += 100
    wanted = queried(load())
    seen: set[str] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not set(METRICS) <= seen:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in text.decode().splitlines():
            found = re.match(r"ray_(apex_\w+)\{[^}]*SessionName=\"[^\"]+\"[^}]*\} (\S+)$", line)
            if found and found.group(1) in EXPORTED:
                name = EXPORTED[found.group(1)]
                if float(found.group(2)) == expected[name]:
                    seen.add(name)
        time.sleep(1)
    m.close()
    assert wanted <= set(METRICS)
    assert set(METRICS) <= seen, f"not exported by Ray as expected: {sorted(set(METRICS) - seen)}"
