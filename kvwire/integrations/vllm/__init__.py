"""kvwire inside vLLM: ``KVWireConnector``, a KV connector for prefill/decode disaggregation.

Load it with ``kv_transfer_config={"kv_connector": "KVWireConnector",
"kv_connector_module_path": "kvwire.integrations.vllm", ...}`` (README: "Use with vLLM").
"""

from .connector import KVWireConnector

__all__ = ["KVWireConnector"]
