"""The Grafana dashboard and the KEDA example query only metrics the collector exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from celery_msg.metrics import families

DOCS = Path(__file__).resolve().parents[2] / "docs"
_NAME = re.compile(r"\bcelery_msg_[a-z_]+")


def _exported() -> set[str]:
    """Every sample name the collector's families can produce (counters end in _total)."""
    names = set()
    for family in families():
        names.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return names


def _queried(text: str) -> set[str]:
    return set(_NAME.findall(text))


def test_every_dashboard_query_names_an_exported_metric():
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    variables = [v.get("definition", "") for v in dashboard["templating"]["list"]]

    queried = _queried("\n".join(exprs + variables))

    assert len(dashboard["panels"]) >= 8
    assert queried and queried <= _exported(), queried - _exported()


def test_the_keda_example_scales_on_exported_ready_and_oldest_age():
    queried = _queried((DOCS / "keda-scaledobject.yaml").read_text())

    assert queried == {"celery_msg_messages", "celery_msg_oldest_ready_age_seconds"}
    assert queried <= _exported()
