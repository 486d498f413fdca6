"""Prometheus text exposition for the workers and the router, with no extra dependency.

Counters and gauges keyed by label values; kvwire's own per-peer metrics (bytes, goodput,
rtt, retransmits) are rendered next to them so a scheduler scraping one endpoint sees both
the serving load and the state of the links.
"""

from __future__ import annotations

import threading
from typing import Iterable, Mapping

PREFIX = "kvwire_serve_"


class Metric:
    """One counter or gauge family; ``labels`` names the label keys, in order."""

    def __init__(self, name: str, help_text: str, kind: str, labels: tuple[str, ...] = ()):
        self.name = PREFIX + name
        self.help_text = help_text
        self.kind = kind
        self.labels = labels
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, *label_values: str) -> None:
        with self._lock:
            key = tuple(label_values)
            self._values[key] = self._values.get(key, 0.0) + amount

    def set(self, value: float, *label_values: str) -> None:
        with self._lock:
            self._values[tuple(label_values)] = value

    def value(self, *label_values: str) -> float:
        with self._lock:
            return self._values.get(tuple(label_values), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labels:
            items = [((), 0.0)]
        for key, value in items:
            lines.append(f"{self.name}{_labels(zip(self.labels, key))} {_number(value)}")
        return lines


class Registry:
    """The metrics of one process."""

    def __init__(self):
        self._metrics: list[Metric] = []

    def counter(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Metric:
        return self._add(Metric(name + "_total", help_text, "counter", labels))

    def gauge(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> Metric:
        return self._add(Metric(name, help_text, "gauge", labels))

    def _add(self, metric: Metric) -> Metric:
        self._metrics.append(metric)
        return metric

    def render(self, extra: Iterable[str] = ()) -> str:
        lines = [line for metric in self._metrics for line in metric.render()]
        return "\n".join([*lines, *extra]) + "\n"


def render_peers(role: str, peers: Mapping[str, object]) -> list[str]:
    """kvwire PeerMetrics (one per peer) as gauges labelled by role and peer."""
    fields = (
        ("kv_bytes", "bytes", "KV payload bytes moved with this peer"),
        ("kv_requests_completed", "requests_completed", "KV transfers completed with this peer"),
        ("kv_requests_failed", "requests_failed", "KV transfers failed with this peer"),
        ("kv_goodput_bps", "goodput_bps", "EWMA of per-request KV goodput, bits per second"),
        ("kv_rtt_ms", "rtt_ms", "Largest smoothed RTT over the peer's connections (TCP_INFO)"),
        ("kv_retransmits", "retransmits", "TCP retransmits over the peer's connections (TCP_INFO)"),
    )
    lines = []
    for name, attribute, help_text in fields:
        full = PREFIX + name
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} gauge"]
        for peer, metrics in sorted(peers.items()):
            labels = _labels((("role", role), ("peer", peer)))
            lines.append(f"{full}{labels} {_number(getattr(metrics, attribute))}")
    return lines


def _labels(pairs) -> str:
    pairs = list(pairs)
    if not pairs:
        return ""
    body = ",".join(f'{key}="{_escape(str(value))}"' for key, value in pairs)
    return "{" + body + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
