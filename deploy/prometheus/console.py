"""The Ape-X Prometheus console page, written from the Grafana dashboard's queries.

``python -m deploy.prometheus.console`` writes ``deploy/prometheus/consoles/apex.html``
from ``deploy/grafana/dashboards/apex-dqn.json``: one graph per dashboard panel with
that panel's queries, verbatim, and a table of their values now. Edit the
dashboard and run it again; tests/test_dashboard.py fails while the page is stale.

The page is a Prometheus console template (Go ``html/template``, served at
``/consoles/apex.html`` by a Prometheus started with ``--web.console.templates``
pointing at ``deploy/prometheus/consoles``). It uses the console libraries
(``prom.lib``: ``prom_console_head``, ``prom_query_drilldown``, ...) that
Prometheus ships as examples; Debian's package puts them in
``/usr/share/doc/prometheus/examples/console_libraries`` (pass that directory as
``--web.console.libraries``). The dashboard's variables become URL parameters:
``?SessionName=<Ray session>`` (default ``.+``, every session) and
``?Cluster=<ray_io_cluster>`` (default ``.*``); ``$__rate_interval`` is 1m.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "apex-dqn.json"
CONSOLE = REPO / "deploy" / "prometheus" / "consoles" / "apex.html"

# the dashboard's variables and their value on the page (URL parameter, default)
VARIABLES = {"SessionName": ".+", "Cluster": ".*"}
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval; 4 x Ray's 10 s scrape interval, and more

# Grafana unit -> (PromConsole formatter, y units, prom.lib humanizer for the table)
UNITS = {
    "short": ("humanizeNoSmallPrefix", "", "humanizeNoSmallPrefix"),
    "percentunit": ("humanizeNoSmallPrefix", "", "humanizePercentage"),
    "bytes": ("humanize1024", "B", "humanize1024"),
    "s": ("humanize", "s", "humanizeDuration"),
}

HEAD = """\
{{/* Ape-X DQN: the panels of deploy/grafana/dashboards/apex-dqn.json as a Prometheus
console page, written by `python -m deploy.prometheus.console`: edit the dashboard,
then run that. Parameters: ?SessionName=<Ray session> (default .+, every session),
?Cluster=<ray_io_cluster> (default .*). Needs prom.lib (--web.console.libraries). */}}
{{- $session := or .Params.SessionName ".+" -}}
{{- $cluster := or .Params.Cluster ".*" -}}
<!doctype html>
<html lang="en">
<head>
<title>Ape-X DQN</title>
{{ template "prom_console_head" }}
<style>
.prom_console_content { padding-top: 1ex; }
.prom_console_rhs { padding-top: 0; }
.prom_console_rhs td { font-size: 0.85rem; }
h3 { font-size: 1.1rem; margin-top: 1.2ex; }
</style>
<script>
// The dashboard's variables, as Grafana substitutes them into a query.
var apexVars = {
  "$SessionName": {{ $session }},
  "$Cluster": {{ $cluster }},
  "$__rate_interval": "%(rate)s"
};
function apexQuery(expr) {
  return expr.replace(/\\$(SessionName|Cluster|__rate_interval)\\b/g, function (v) {
    return apexVars[v];
  });
}
</script>
</head>
<body>
"""

TAIL = """\
{{ template "prom_content_tail" . }}
{{ template "tail" }}
"""


def _go_raw(text: str) -> str:
    """A Go template raw string constant."""
    if "`" in text:
        raise ValueError(f"a query holds a backquote, which a Go raw string cannot: {text}")
    return f"`{text}`"


def _server_side(expr: str) -> str:
    """The Go template expression that substitutes the variables into ``expr``."""
    out = _go_raw(expr.replace("$__rate_interval", RATE_INTERVAL))
    for name in VARIABLES:
        var = "$session" if name == "SessionName" else "$cluster"
        out = f"(reReplaceAll `\\${name}` {var} {out})"
    return out


def _panels(dash: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(row title, its timeseries panels) in the dashboard's order (by position)."""
    rows: list[tuple[str, list[dict[str, Any]]]] = [("", [])]
    order = sorted(dash["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    for p in order:
        if p["type"] == "row":
            rows.append((p["title"], []))
        else:
            rows[-1][1].append(p)
    return [r for r in rows if r[1]]


def render(dash: dict[str, Any]) -> str:
    """The console page for dashboard JSON ``dash``."""
    texts = [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    for p in dash["panels"]:
        texts += [p["title"], p.get("description", "")]
        texts += [s for t in p.get("targets", []) for s in (t["expr"], t["legendFormat"])]
    for text in texts:
        if "{{" in text or "}}" in text:
            raise ValueError(
                f"'{{{{' or '}}}}' in the dashboard, which a console page cannot hold: {text}"
            )
    rows = _panels(dash)
    parts = [HEAD % {"rate": RATE_INTERVAL}]

    # right: the value of every query now (evaluated by Prometheus as the page renders)
    parts.append('{{ template "prom_right_table_head" }}\n')
    for title, panels in rows:
        parts.append(f'<tr><th colspan="2">{html.escape(title)}</th></tr>\n')
        for p in panels:
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            humanizer = UNITS[unit][2]
            for t in p["targets"]:
                label = (
                    p["title"] if len(p["targets"]) == 1 else f"{p['title']}: {t['legendFormat']}"
                )
                label = html.escape(label)
                value = f'(args {_server_side(t["expr"])} "" "{humanizer}")'
                parts.append(
                    f'<tr><td>{label}</td><td>{{{{ template "prom_query_drilldown" {value} }}}}</td></tr>\n'
                )
    parts.append('{{ template "prom_right_table_tail" }}\n\n')

    # left: the Ray sessions (the SessionName variable's values), then one graph per panel
    session_query = next(
        v["query"]["query"] for v in dash["templating"]["list"] if v["name"] == "SessionName"
    )
    metric = re.fullmatch(r"label_values\((\w+)\{.*\}, SessionName\)", session_query)
    if metric is None:
        raise ValueError(f"unexpected SessionName query: {session_query}")
    parts.append('{{ template "prom_content_head" . }}\n')
    parts.append('<div class="prom_content_div">\n<h1>Ape-X DQN</h1>\n')
    # the sessions: a server-side query with the cluster substituted, over the last
    # hour as Grafana's label_values looks over its time range (an instant query
    # misses a session whose node metric missed the newest scrape)
    parts.append(
        '<p>Ray session: <b>{{ $session }}</b>{{ if ne $cluster ".*" }}, cluster '
        "<b>{{ $cluster }}</b>{{ end }}. Sessions:\n"
        + "{{ range query "
        + _server_side(
            f"count by (SessionName) "
            f'(last_over_time({metric.group(1)}{{ray_io_cluster=~"$Cluster"}}[1h]))'
        )
        + ' | sortByLabel "SessionName" }}\n'
        '<a href="apex.html?SessionName={{ .Labels.SessionName }}">{{ .Labels.SessionName }}</a>\n'
        "{{ end }}</p>\n"
    )
    for title, panels in rows:
        if title:
            parts.append(f"<h2>{html.escape(title)}</h2>\n")
        for p in panels:
            unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
            formatter, y_units, _ = UNITS[unit]
            exprs = ", ".join(f"apexQuery({json.dumps(t['expr'])})" for t in p["targets"])
            names = ", ".join(json.dumps(t["legendFormat"]) for t in p["targets"])
            tip = html.escape(p.get("description", ""), quote=True)
            parts.append(
                f"<h3>{html.escape(p['title'])}</h3>\n"
                f'<div id="panel-{p["id"]}" class="apex-panel" title="{tip}"></div>\n'
                "<script>\n"
                "new PromConsole.Graph({\n"
                f'  node: document.querySelector("#panel-{p["id"]}"),\n'
                f"  expr: [{exprs}],\n"
                f"  name: [{names}],\n"
                f"  yAxisFormatter: PromConsole.NumberFormatter.{formatter},\n"
                f"  yHoverFormatter: PromConsole.NumberFormatter.{formatter},\n"
                f'  yUnits: "{y_units}",\n'
                f"  yTitle: {json.dumps(p['title'])},\n"
                "  height: 160,\n"
                "});\n"
                "</script>\n"
            )
    parts.append("</div>\n")
    parts.append(TAIL)
    return "".join(parts)


def main() -> None:
    CONSOLE.parent.mkdir(parents=True, exist_ok=True)
    CONSOLE.write_text(render(json.loads(DASHBOARD.read_text())))
    print(f"wrote {CONSOLE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
