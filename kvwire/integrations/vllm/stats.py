"""kvwire's transfer figures in vLLM's own stats and Prometheus ``/metrics``.

Workers hand a ``KVWireStats`` to vLLM each step; vLLM aggregates them, logs a summary
("KV Transfer metrics: ...") and feeds ``KVWirePromMetrics``, which exports
``vllm:kvwire_*``: bytes, per-transfer time and goodput, tokens loaded, failures by error
class, and each link's TCP_INFO (RTT, retransmits), the congestion signals a PrfaaS
router throttles on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

_LISTS = ("transfer_seconds", "transfer_bytes")
_COUNTS = ("sent_requests", "loaded_requests", "loaded_tokens", "failed_sends", "failed_loads")


def empty() -> dict[str, Any]:
    return {**{k: [] for k in _LISTS}, **{k: 0 for k in _COUNTS}, "failures": {}, "links": {}}


@dataclass
class KVWireStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=empty)

    def reset(self) -> None:
        self.data = empty()

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        self.data["transfer_bytes"].append(nbytes)
        self.data["transfer_seconds"].append(seconds)

    def record_failure(self, kind: str, error: BaseException | str) -> None:
        self.data[kind] += 1
        name = error if isinstance(error, str) else type(error).__name__
        self.data["failures"][name] = self.data["failures"].get(name, 0) + 1

    def aggregate(self, other: KVConnectorStats) -> KVWireStats:
        theirs = other.data
        for key in _LISTS:
            self.data[key] = self.data[key] + list(theirs.get(key, ()))
        for key in _COUNTS:
            self.data[key] += theirs.get(key, 0)
        for name, count in theirs.get("failures", {}).items():
            self.data["failures"][name] = self.data["failures"].get(name, 0) + count
        self.data["links"].update(theirs.get("links", {}))
        return self

    def reduce(self) -> dict[str, int | float]:
        seconds, nbytes = self.data["transfer_seconds"], self.data["transfer_bytes"]
        out: dict[str, int | float] = {k: self.data[k] for k in _COUNTS}
        out["transfers"] = len(seconds)
        out["bytes_mb"] = round(sum(nbytes) / 1e6, 3)
        if seconds:
            out["avg_transfer_ms"] = round(1000 * sum(seconds) / len(seconds), 3)
            out["goodput_gbps"] = round(8 * sum(nbytes) / max(sum(seconds), 1e-9) / 1e9, 3)
        for peer, link in self.data["links"].items():
            out[f"rtt_ms[{peer}]"] = link["rtt_ms"]
        return out

    def is_empty(self) -> bool:
        return not (self.data["transfer_seconds"] or any(self.data[k] for k in _COUNTS) or self.data["links"])


class KVWirePromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from vllm.v1.metrics.utils import create_metric_per_engine

        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(cls, name, doc, extra_labels=(), **kw):
            metric = cls(name=f"vllm:kvwire_{name}", documentation=doc, labelnames=[*labelnames, *extra_labels], **kw)
            return create_metric_per_engine(metric, per_engine_labelvalues) if not extra_labels else metric

        self.seconds = per_engine(self._histogram_cls, "transfer_seconds", "Time of one kvwire KV transfer, "
                                  "open to verified", buckets=[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 60])
        self.nbytes = per_engine(self._histogram_cls, "transfer_bytes", "Wire bytes of one kvwire KV transfer",
                                 buckets=[2 ** (10 + 2 * i) for i in range(12)])
        self.counters = {key: per_engine(self._counter_cls, key, f"kvwire {key.replace('_', ' ')}") for key in _COUNTS}
        self.bytes_total = per_engine(self._counter_cls, "bytes", "kvwire KV bytes moved")
        self.errors = per_engine(self._counter_cls, "errors", "kvwire transfer failures by error class",
                                 extra_labels=("error",))
        self.rtt = per_engine(self._gauge_cls, "link_rtt_ms", "Smoothed RTT of the kvwire link (TCP_INFO)",
                              extra_labels=("peer",))
        self.retransmits = per_engine(self._gauge_cls, "link_retransmits", "Retransmitted segments on the kvwire "
                                      "link (TCP_INFO)", extra_labels=("peer",))
        self.goodput = per_engine(self._gauge_cls, "link_goodput_bps", "kvwire goodput EWMA to or from the peer",
                                  extra_labels=("peer",))
        self.link_bytes = per_engine(self._gauge_cls, "link_bytes", "kvwire bytes moved to or from the peer so far",
                                     extra_labels=("peer",))
        # What a router needs before the first request: the role and the address to push to.
        transfer = vllm_config.kv_transfer_config
        extra = transfer.kv_connector_extra_config or {}
        self.info = per_engine(self._gauge_cls, "info", "This instance's KVWireConnector: kv_role, and the kvwire "
                               "address its Receiver listens on (listen) or it pushes to by default (decode)",
                               extra_labels=("kv_role", "listen", "decode"))
        for values in per_engine_labelvalues.values():
            self.info.labels(*(str(v) for v in values), str(transfer.kv_role), str(extra.get("listen") or ""),
                             str(extra.get("decode") or "")).set(1)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = [str(v) for v in self.per_engine_labelvalues[engine_idx]]
        for seconds in transfer_stats_data.get("transfer_seconds", ()):
            self.seconds[engine_idx].observe(seconds)
        for nbytes in transfer_stats_data.get("transfer_bytes", ()):
            self.nbytes[engine_idx].observe(nbytes)
            self.bytes_total[engine_idx].inc(nbytes)
        for key, counter in self.counters.items():
            if transfer_stats_data.get(key):
                counter[engine_idx].inc(transfer_stats_data[key])
        for name, count in transfer_stats_data.get("failures", {}).items():
            self.errors.labels(*labels, name).inc(count)
        for peer, link in transfer_stats_data.get("links", {}).items():
            self.rtt.labels(*labels, peer).set(link["rtt_ms"])
            self.retransmits.labels(*labels, peer).set(link["retransmits"])
            self.goodput.labels(*labels, peer).set(link["goodput_bps"])
            self.link_bytes.labels(*labels, peer).set(link.get("bytes", 0))
