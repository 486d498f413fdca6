"""``KVWireConnector``: vLLM's KV connector API (``KVConnectorBase_V1`` + ``SupportsHMA``)
over kvwire, for prefill/decode disaggregation of hybrid models across datacenters.

vLLM builds one instance per role: the scheduler's (``ConnectorScheduler``: which
requests push or load, into which blocks) and each worker's (``ConnectorWorker``: the
kvwire Senders and Receiver). This class only routes vLLM's calls to the right half.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from .config import ConnectorConfig
from .scheduler import ConnectorScheduler, StepPlan
from .stats import KVWirePromMetrics, KVWireStats
from .worker import ConnectorWorker


@dataclass
class KVWireMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class KVWireWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler: load outcomes {req_id: (ok, error, bytes, seconds)}, and decode
    addresses this prefill instance cannot pair with {address: why} (another model, TP
    sizes that do not divide), so later requests to them say why at once."""

    outcomes: dict[str, tuple[bool, str | None, int, float]] = field(default_factory=dict)
    unpairable: dict[str, str] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVWireWorkerMetadata:
        merged = dict(self.outcomes)
        for req_id, outcome in getattr(other, "outcomes", {}).items():
            mine = merged.get(req_id)
            if mine is None or not outcome[0]:  # one rank's failure fails the load
                merged[req_id] = outcome
            elif mine[0]:  # every rank landed its shard: the request's bytes are theirs together
                merged[req_id] = (True, None, mine[2] + outcome[2], max(mine[3], outcome[3]))
        return KVWireWorkerMetadata(merged, {**self.unpairable, **getattr(other, "unpairable", {})})


class KVWireConnector(KVConnectorBase_V1, SupportsHMA):
    """See the README's "Use with vLLM" for the ``kv_connector_extra_config`` keys."""

    worker_class = ConnectorWorker  # what a worker process runs (a subclass may swap it)

    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        kv_role = transfer.kv_role
        self.config = ConnectorConfig.parse(transfer.kv_connector_extra_config, role=kv_role)
        self.scheduler: ConnectorScheduler | None = None
        self.worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = ConnectorScheduler(self.config, vllm_config, kv_cache_config, kv_role)
        else:
            self.worker = self.worker_class(self.config, vllm_config, kv_cache_config, kv_role)

    # -- scheduler side --------------------------------------------------------------------

    def bind_kv_cache_manager(self, kv_cache_manager) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        self.scheduler.kv_manager = kv_cache_manager

    def on_new_request(self, request) -> None:
        self.scheduler.on_new_request(request)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def get_loaded_kv_cache_group_ids(self, request) -> tuple[int, ...]:
        return self._kv_cache_config.transfer_group_ids  # a push restores every group

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self.scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return KVWireMetadata(self.scheduler.build_connector_meta(scheduler_output))

    def update_connector_output(self, connector_output) -> None:
        meta = connector_output.kv_connector_worker_meta
        for req_id, (ok, error, nbytes, seconds) in getattr(meta, "outcomes", {}).items():
            self.scheduler.loaded(req_id, ok=ok, error=error, nbytes=nbytes, seconds=seconds)
        for address, why in getattr(meta, "unpairable", {}).items():
            self.scheduler.unpairable(address, why)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return self.scheduler.request_finished(request, block_ids)

    # -- worker side -----------------------------------------------------------------------

    def register_kv_caches(self, kv_caches) -> None:
        self.worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        self.worker.start_load_kv(self._get_connector_metadata().plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: a request runs only once all of its KV landed

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs) -> None:
        self.worker.save_kv_layer(layer_name)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        finished, failed = self.worker.poll_loads()
        return KVConnectorTransferResults(finished_recving=finished, failed_recving=failed)

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        outcomes, unpairable = self.worker.take_outcomes()
        return KVWireWorkerMetadata(outcomes, unpairable) if outcomes or unpairable else None

    def get_kv_connector_stats(self):
        return self.worker.take_stats() if self.worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVWireStats(data=data) if data is not None else KVWireStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return KVWirePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.shutdown()
