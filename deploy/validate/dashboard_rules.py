"""Write every PromQL query of Grafana dashboards as a Prometheus rules file, so that
`promtool check rules` parses each one with Prometheus's own PromQL parser.

    python dashboard_rules.py OUT.yml DASHBOARD.json...

Grafana's interval variables ($__rate_interval, $__interval, $__range, ...) are replaced by
a duration first, as Grafana does before it sends a query, and the dashboard's own template
variables (a camera, say) by a sample value, as a label matcher would hold one. A dashboard with no query at all
is an error. The rules file is JSON, which YAML parsers (promtool's included) read.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DURATIONS = re.compile(r"\$\{?(__rate_interval|__interval|__range|__range_s|__range_ms)\}?")
VARIABLE = re.compile(r"\$\{?[A-Za-z_]\w*")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def queries(dashboard: dict):
    """(panel id, panel title, refId, expr) of every Prometheus target."""
    for panel in panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr is not None:
                yield panel.get("id"), panel.get("title", ""), target.get("refId", "?"), expr


def promql(expr: str, variables: tuple[str, ...] = ()) -> str:
    def duration(m: re.Match) -> str:
        return {"__range_s": "3600", "__range_ms": "3600000"}.get(m.group(1), "5m")

    expr = DURATIONS.sub(duration, expr)
    for name in variables:
        expr = re.sub(r"\$\{?" + re.escape(name) + r"\b\}?", "sample", expr)
    return expr


def template_variables(dashboard: dict) -> tuple[str, ...]:
    """The dashboard's query and custom variables (not the datasource, which is no PromQL)."""
    return tuple(v["name"] for v in dashboard.get("templating", {}).get("list", []) if v.get("type") in ("query", "custom", "textbox"))


def main(out: str, files: list[str]) -> int:
    rules = []
    for file in files:
        dashboard = json.loads(Path(file).read_text(encoding="utf-8"))
        found = list(queries(dashboard))
        if not found:
            print(f"dashboard_rules: {file}: no Prometheus query", file=sys.stderr)
            return 1
        variables = template_variables(dashboard)
        leftover = [(pid, ref, e) for pid, _, ref, e in found if VARIABLE.search(promql(e, variables))]
        if leftover:
            for pid, ref, e in leftover:
                print(f"dashboard_rules: {file}: panel {pid} {ref}: unknown variable in {e!r}", file=sys.stderr)
            return 1
        stem = re.sub(r"\W", "_", Path(file).stem)
        for pid, title, ref, expr in found:
            rules.append({"record": f"dashboard:{stem}:panel_{pid}_{ref}", "expr": promql(expr, variables),
                          "labels": {"panel": str(title)}})
    Path(out).write_text(json.dumps({"groups": [{"name": "dashboard-queries", "rules": rules}]}, indent=1), encoding="utf-8")
    print(f"dashboard_rules: {len(rules)} queries from {len(files)} dashboard(s) -> {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(f"usage: {sys.argv[0]} OUT.yml DASHBOARD.json...")
    sys.exit(main(sys.argv[1], sys.argv[2:]))
