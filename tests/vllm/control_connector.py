"""A control for the tests: a decode side that lands attention KV but not the
linear-attention states, to show the token check can tell a transfer that misses them."""

from kvwire.integrations.vllm import KVWireConnector
from kvwire.integrations.vllm.cache import StateLayer
from kvwire.integrations.vllm.worker import ConnectorWorker


class SkipStatesWorker(ConnectorWorker):
    def land_layer(self, plan, index, tensors):
        if not isinstance(self.cache.layers[index], StateLayer):
            super().land_layer(plan, index, tensors)


class SkipStatesConnector(KVWireConnector):
    worker_class = SkipStatesWorker
