"""Reading a server's `GET /metrics` the way Prometheus does: parsed by prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, headers: dict | None = None) -> list[Metric]:
    """The metric families at `url` (a server's `.../metrics`)."""
    reply = httpx.get(url, headers=headers or {}, timeout=30)
    reply.raise_for_status()
    assert reply.headers["content-type"].startswith("text/plain"), reply.headers["content-type"]
    return list(text_string_to_metric_families(reply.text))


def total(families: list[Metric], sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` (`vlm_requests_total`, `..._count`) whose labels include `labels`."""
    return sum(s.value for f in families for s in f.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def totals(families: list[Metric]) -> dict[str, float]:
    """Every sample name with its values summed over their labels."""
    out: dict[str, float] = {}
    for family in families:
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out
