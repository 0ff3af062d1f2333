"""The Grafana dashboard and the Prometheus alert rules under deploy/ query metrics the gateway exports.

promtool (Debian's ``prometheus`` package) checks the rules and runs their unit tests
(``deploy/prometheus/alerts.test.yml``); every metric a panel or a rule names must be one that
``gateway.metrics.Metrics`` really exposes, so a renamed metric cannot leave a silent dashboard.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from gateway.metrics import Metrics
from tests.support.tools import require_tool

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "ticketgate.json"

# Named by a rule before the gateway exports it (none now). The dashboard may name only what exists.
ANNOUNCED: set[str] = set()
_METRIC = re.compile(r"\bticketgate_[a-z0-9_]+")


def exposition() -> str:
    """What /metrics serves once every metric has a sample (labelled metrics show none before)."""
    metrics = Metrics()
    metrics.message_received("wechat")
    metrics.message_done("wechat", "accepted", 0.01)
    metrics.channel_event("telegram", "acme", "media_failed")
    metrics.refused("telegram", "acme", "signature")
    metrics.publish_confirmed(1)
    metrics.publish_failed("timeout")
    metrics.outbox_status(1, 2.0)
    metrics.broker_connected.set(1)
    metrics.reply_sent("email", "demo", 0.2)
    metrics.reply_failed("wechat", "window_closed", attempted=False)
    metrics.reply_retry("email")
    metrics.reply_status(1, 3.0)
    return metrics.exposition().decode()


def exported() -> set[str]:
    samples = [line for line in exposition().splitlines() if not line.startswith("#")]
    return {line.split("{")[0].split(" ")[0] for line in samples}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append((f"variable {variable['name']}", variable["query"]["query"]))
    return queries


def rule_expressions() -> list[tuple[str, str]]:
    """(alert, expr) pairs, read without a YAML parser: each ``expr`` block up to the ``for:`` or
    ``labels:`` that follows it (promtool, below, is the real parser)."""
    text = RULES.read_text(encoding="utf-8")
    found = re.findall(r"- alert: (\S+)\n\s+expr: (.*?)\n\s+(?:for|labels):", text, flags=re.S)
    return [(name, expr) for name, expr in found]


def test_every_dashboard_query_names_an_exported_metric() -> None:
    names = exported()
    queries = dashboard_queries()
    assert len(queries) >= 15
    for title, expr in queries:
        used = set(_METRIC.findall(expr))
        assert used, f"{title}: no ticketgate metric in {expr!r}"
        assert used <= names, f"{title}: {sorted(used - names)} are not exported (have {sorted(names)})"


def test_every_rule_names_an_exported_or_announced_metric() -> None:
    names = exported() | ANNOUNCED
    rules = rule_expressions()
    assert {name for name, _ in rules} == {
        "TicketgateOutboxBacklogAging",
        "TicketgateQuarantineGrowing",
        "TicketgateSignatureFailures",
        "TicketgateDeadlineMissesWeChat",
        "TicketgateDeadlineMissesTelegram",
        "TicketgateDeadlineMissesHttp",
        "TicketgateBrokerDisconnected",
        "TicketgateReplyFailures",
        "TicketgateRetentionStalled",
    }
    for name, expr in rules:
        used = set(_METRIC.findall(expr))
        assert used, f"{name}: no ticketgate metric in {expr!r}"
        assert used <= names, f"{name}: {sorted(used - names)} are not exported"


def test_the_deadline_rules_match_histogram_buckets_the_gateway_has() -> None:
    """``le="5.0"`` must be a bucket boundary as prometheus_client writes it, or the rule sees nothing."""
    bucket = r'ticketgate_ack_latency_seconds_bucket\{channel="wechat",le="([^"]+)"\}'
    buckets = set(re.findall(bucket, exposition()))
    text = RULES.read_text(encoding="utf-8") + DASHBOARD.read_text(encoding="utf-8")
    used = set(re.findall(r'le=\\?"([^"\\]+)\\?"', text))
    assert used, "no bucket named"
    assert used <= buckets, f"{sorted(used - buckets)} are not buckets of ticketgate_ack_latency_seconds"


@pytest.fixture(scope="module")
def promtool() -> str:
    return require_tool("promtool", "prometheus")


def test_promtool_checks_the_rules(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_promtool_unit_tests_of_every_alert_pass(promtool: str) -> None:
    done = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname: (\S+)", RULE_TESTS.read_text(encoding="utf-8")))
    assert tested == {name for name, _ in rule_expressions()}, "an alert without a unit test"


def test_promtool_accepts_what_metrics_serves(promtool: str) -> None:
    done = subprocess.run([promtool, "check", "metrics"], input=exposition(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
