"""Prometheus behind the MetricSource protocol (rollout.queries), through the bounded HTTP client: every answer at most
the install policy's bytes and seconds, TLS verified (against the install's CA when it names one), no redirects, no
proxies. A policy names its Prometheus, so what answers may be anything: what fails reaches status only as a
classified reason (QueryError.reason: MetricsUnreachable, QueryFailed), never as the answer's text."""

from __future__ import annotations

import json
import urllib.parse
from typing import Any

from quantrol_operator.api.servingpolicy import NoJudgement
from quantrol_operator.observe import http
from quantrol_operator.policy import ReadBounds
from quantrol_operator.rollout.queries import QueryError


class PrometheusSource:
    """Instant queries (`/api/v1/query`), one bounded call each; no retries inside a pass (the next pass retries, and
    a down Prometheus must read as `error` within seconds, not after a back-off)."""

    def __init__(self, url: str, bounds: ReadBounds | None = None, ca_file: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.bounds = bounds or ReadBounds()
        self.ca_file = ca_file

    def scalar(self, promql: str) -> float | None:
        seconds = self.bounds.total_seconds
        query = urllib.parse.urlencode({"query": promql, "timeout": f"{max(1, int(seconds))}s"})
        try:
            status, body = http.request(f"{self.url}/api/v1/query?{query}", total_seconds=seconds,
                                        max_bytes=self.bounds.max_bytes, ca_file=self.ca_file)
        except (OSError, ValueError) as exc:  # refused, DNS, TLS, a bound exceeded: no (complete) answer
            raise QueryError(f"{self.url}: {type(exc).__name__}: {exc}", NoJudgement.METRICS_UNREACHABLE) from exc
        if status != 200:  # an error answer, or a redirect (never followed)
            raise QueryError(f"{self.url}: HTTP {status}", NoJudgement.QUERY_FAILED)
        return _first_value(self.url, body)


def _first_value(url: str, body: bytes) -> float | None:
    try:
        answer: Any = json.loads(body)
        result = answer["data"]["result"]
        if answer.get("status") != "success" or not isinstance(result, list):
            raise ValueError(answer.get("status"))
        return float(result[0]["value"][1]) if result else None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise QueryError(f"{url}: not a Prometheus vector answer ({type(exc).__name__})",
                         NoJudgement.QUERY_FAILED) from exc
