"""The Grafana dashboard (k8s/monitoring/mars-dashboard.json) queries only what mars-ray
exports: every metric name in every PromQL expression (panel targets and template
variables) is a series of :func:`mars_ray.telemetry.exported_series_names`, every label
it groups, filters or labels legends by belongs to those metrics (or is a Prometheus
target label), and the panels the deployment issue asks for are there.

Metric names are found by a small PromQL tokenizer: strings, label matchers, range
selectors, Grafana variables and ``by (...)``-style label lists are removed, and what is
left of the identifiers, minus keywords and function calls (an identifier followed by
``(``), are metric names. The tokenizer has tests of its own, including a typo that must
be caught.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mars_ray.telemetry import METRICS, exported_series_names

DASHBOARD = Path(__file__).resolve().parents[1] / "k8s" / "monitoring" / "mars-dashboard.json"

# Labels Prometheus (and the Prometheus Operator's scrape configs) attach to every target.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "instance", "job", "service", "endpoint", "container", "ray_io_cluster"}
)
_KEYWORDS = frozenset(
    {
        "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
        "and", "or", "unless", "offset", "atan2", "inf", "nan",
        "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
        "bottomk", "topk", "quantile", "limitk", "limit_ratio",
    }
)  # fmt: skip
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_TOKEN = re.compile(
    r"(?P<num>0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)"
)
_MATCHER_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.*),\s*(?P<label>\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.S)


def extract_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (identifiers that are not functions, keywords,
    labels, numbers, durations or Grafana variables)."""
    text = _STRING.sub('""', expr)
    text = _VARIABLE.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        name = match.group("ident")
        if name is None or name in _KEYWORDS:
            continue
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call
        names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression filters on (matchers) or groups by (``by``, ``on``, ...)."""
    text = _STRING.sub('""', expr)
    labels = set()
    for block in _MATCHERS.findall(text):
        labels |= set(_MATCHER_LABEL.findall(block))
    for group in _LABEL_LIST.findall(text):
        labels |= {part.strip() for part in group.split(",") if part.strip()}
    return labels


def _labels_of_series() -> dict[str, frozenset[str]]:
    labels = {}
    for spec in METRICS:
        base = frozenset(spec.labels)
        for series in exported_series_names():
            if series == spec.name or series.startswith(spec.name + "_"):
                extra = {"le"} if series == spec.name + "_bucket" else set()
                labels[series] = base | extra
    return labels


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        yield item
        yield from _panels(item.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend) for every panel target and every query variable."""
    queries = []
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            queries.append((where, target.get("expr", ""), target.get("legendFormat", "")))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        if m := _LABEL_VALUES.match(text):
            text = m.group("selector")
        elif m := _QUERY_RESULT.match(text):
            text = m.group("expr")
        queries.append((f"variable ${var.get('name')}", text, ""))
    return queries


def dashboard_problems(dashboard: dict[str, Any]) -> list[str]:
    """Every query that names no metric, an unexported metric, or a label those metrics
    do not have; empty when the dashboard is consistent with what the code exports."""
    exported = exported_series_names()
    series_labels = _labels_of_series()
    problems = []
    for where, expr, legend in dashboard_queries(dashboard):
        names = extract_metric_names(expr)
        if not names:
            problems.append(f"{where}: no metric in {expr!r}")
        unknown = sorted(names - exported)
        for name in unknown:
            problems.append(f"{where}: {name!r} is not exported by mars_ray.telemetry")
        if unknown:
            continue  # its labels cannot be checked
        known = set(TARGET_LABELS)
        for name in names:
            known |= series_labels[name]
        used = label_names(expr) | set(_LEGEND_LABEL.findall(legend))
        for label in sorted(used - known):
            problems.append(f"{where}: label {label!r} is not a label of {sorted(names)}")
    return problems


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


# -- the tokenizer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("mars_sessions_active", {"mars_sessions_active"}),
        (
            'sum by (engine) (rate(mars_turns_total{namespace="$namespace", '
            'engine=~"$engine"}[$__rate_interval]))',
            {"mars_turns_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(mars_session_jct_seconds_bucket[5m])))",
            {"mars_session_jct_seconds_bucket"},
        ),
        (
            'sum by (alpha) (rate(mars_sessions_goodput_total{alpha="3"}[1h] offset 1d)) '
            "/ ignoring (alpha) group_left sum(rate(mars_sessions_completed_total[5m]))",
            {"mars_sessions_goodput_total", "mars_sessions_completed_total"},
        ),
        ("sum(mars_tool_workers) without (node) > bool 1e3", {"mars_tool_workers"}),
        ('60 * sum(rate(x{a="sum(y)", b=~"z|w"}[${__range}])) or vector(0)', {"x"}),
        ("topk(5, mars_kv_usage_ratio) unless on (engine) mars_kv_demand_ratio > 0.5", None),
        ('{__name__="mars_turns_total"}', set()),
    ],
)
def test_extractor_finds_metric_names(expr: str, names: set[str] | None) -> None:
    expected = names if names is not None else {"mars_kv_usage_ratio", "mars_kv_demand_ratio"}
    assert extract_metric_names(expr) == expected


def test_label_names_of_matchers_and_groupings() -> None:
    expr = 'sum by (node) (rate(m{namespace="a", engine!~"b"}[5m])) / on(node) group_left n'
    assert label_names(expr) == {"node", "namespace", "engine"}


def test_a_typo_in_a_metric_name_is_caught(dashboard: dict[str, Any]) -> None:
    broken = copy.deepcopy(dashboard)
    target = next(
        t
        for p in _panels(broken["panels"])
        for t in p.get("targets", [])
        if "mars_kv_usage_ratio" in t["expr"]
    )
    target["expr"] = target["expr"].replace("mars_kv_usage_ratio", "mars_kv_usage_ration")
    problems = dashboard_problems(broken)
    assert len(problems) == 1 and "'mars_kv_usage_ration' is not exported" in problems[0]


def test_a_counter_without_its_suffix_and_a_wrong_label_are_caught() -> None:
    broken = {
        "panels": [
            {
                "title": "t",
                "targets": [
                    {"refId": "A", "expr": "rate(mars_turns[5m])"},
                    {"refId": "B", "expr": "sum by (engine) (mars_tool_workers)"},
                    {"refId": "C", "expr": "mars_tool_workers", "legendFormat": "{{engine}}"},
                    {"refId": "D", "expr": "vector(1)"},
                ],
            }
        ]
    }
    problems = dashboard_problems(broken)
    assert any("'mars_turns' is not exported" in p for p in problems)
    assert sum("label 'engine'" in p for p in problems) == 2
    assert any("no metric" in p for p in problems)


# -- the dashboard -------------------------------------------------------------------


def test_every_query_names_only_exported_metrics_and_their_labels(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard_queries(dashboard), "the dashboard has no queries"
    assert dashboard_problems(dashboard) == []


def _queries_of(panel: dict[str, Any]) -> str:
    return "\n".join(t.get("expr", "") for t in panel.get("targets", []))


def _panel_using(dashboard: dict[str, Any], *needles: str) -> dict[str, Any] | None:
    for panel in _panels(dashboard["panels"]):
        text = _queries_of(panel)
        if all(n in text for n in needles):
            return panel
    return None


@pytest.mark.parametrize(
    ("what", "needles"),
    [
        ("goodput", ("mars_sessions_goodput_total", "mars_sessions_completed_total")),
        ("JCT p50", ("histogram_quantile(0.5,", "mars_session_jct_seconds_bucket")),
        ("JCT p90", ("histogram_quantile(0.9,", "mars_session_jct_seconds_bucket")),
        ("JCT p99", ("histogram_quantile(0.99,", "mars_session_jct_seconds_bucket")),
        ("KV usage", ("mars_kv_usage_ratio",)),
        ("KV evictions", ("mars_kv_evicted_blocks_total",)),
        ("admission window", ("mars_admission_window_sessions",)),
        ("tool pool load", ("mars_tool_in_flight_calls", "mars_tool_workers")),
    ],
)
def test_the_panels_the_issue_asks_for_are_there(
    dashboard: dict[str, Any], what: str, needles: tuple[str, ...]
) -> None:
    assert _panel_using(dashboard, *needles) is not None, f"no panel shows {what}"


def test_per_gpu_panels_split_by_engine(dashboard: dict[str, Any]) -> None:
    per_gpu = [
        p
        for p in _panels(dashboard["panels"])
        if p.get("targets")
        and all('engine=~"$engine"' in t["expr"] for t in p["targets"])
        and all("{{engine}}" in t.get("legendFormat", "") for t in p["targets"])
    ]
    titles = {p["title"] for p in per_gpu}
    assert len(per_gpu) >= 5, titles
    assert {"KV usage per GPU", "GPU busy fraction"} <= titles
    engine_var = next(v for v in dashboard["templating"]["list"] if v["name"] == "engine")
    assert engine_var["multi"] and engine_var["includeAll"]


def test_dashboard_is_well_formed_for_grafana(dashboard: dict[str, Any]) -> None:
    panels = list(_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"] == "mars-ray" and dashboard["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "engine", "alpha"} <= variables
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            # Scoped to one deployment: a namespace can hold only one mars-ray.
            assert 'namespace="$namespace"' in target["expr"], (panel["title"], target["expr"])
