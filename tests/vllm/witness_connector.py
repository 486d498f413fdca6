"""A witness for the transport's promise inside the engine: KVWireConnector as it is, plus
a copy of the bytes each side holds for a pushed request, read straight from vLLM's cache
tensors, written to ``$KVWIRE_WITNESS_DIR`` as ``<kvwire id>.<side>.npz`` (``.<side>.rank<r>.npz``
for a rank of a tensor-parallel instance).

- prefill: at the end of the step that completes the prompt (``wait_for_save``, before
  kvwire is handed the states), the request's attention blocks (every block holding its
  first ``num_tokens`` positions) and its state slot, per layer;
- decode: once the load has landed (``land``), before vLLM schedules the request, so
  before its own step writes the last prompt token: the same, in the decode side's blocks.

The blocks are indexed here from vLLM's block ids and the cache tensor's own shape, not
through kvwire's gather/scatter, so a wrong block or row on either side shows. A CPU
attention block is read by token (its first ``num_tokens`` positions), since its other
rows hold whatever each side's memory held.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from kvwire.integrations.vllm import KVWireConnector
from kvwire.integrations.vllm.cache import AttentionLayer
from kvwire.integrations.vllm.worker import ConnectorWorker


def _raw(tensor) -> np.ndarray:
    """The bytes, shaped like the tensor (its last dimension in bytes), so shards can be joined."""
    return tensor.contiguous().view(torch.uint8).numpy()  # written out at once: no copy needed


def held_bytes(worker: ConnectorWorker, block_ids, num_tokens: int) -> dict[str, np.ndarray]:
    """Per vLLM layer name, the bytes of the request's blocks (attention: the blocks that
    hold positions 0..num_tokens-1; linear attention: each state view's slot)."""
    cache, out = worker.cache, {}
    for layer, group in zip(cache.layers, cache.groups):
        ids = list(block_ids[group])
        if isinstance(layer, AttentionLayer):
            tensor = layer.cache
            kernel_block = layer.kernel_block  # the cache tensor's block dimension
            ratio = layer.block_size // kernel_block
            kernel_ids = [b * ratio + k for b in ids for k in range(ratio)][: -(-num_tokens // kernel_block)]
            if layer.form == "nhd":
                rows = tensor[:, kernel_ids]
            elif layer.form == "cpu":  # the block's interior by token (an order checked in test_cpu_blocks)
                flat = tensor[kernel_ids].reshape(len(kernel_ids), -1)[:, layer.order]
                rows = flat.reshape(len(kernel_ids) * kernel_block, *layer.tensors["kv"].shape)[:num_tokens]
            else:
                rows = tensor[kernel_ids]
            out[layer.name] = _raw(rows)
        else:
            slot = ids[-1]  # vLLM keeps the running state in the group's last block of the request
            for name, view in zip(layer.names, layer.views):
                out[f"{layer.name}:{name}"] = _raw(view[slot])
    return out


def _write(worker: ConnectorWorker, kvwire_id: str, side: str, arrays: dict[str, np.ndarray]) -> None:
    """``<kvwire id>.<side>.npz``; a rank of a TP instance adds ``.rank<r>``."""
    folder = os.environ["KVWIRE_WITNESS_DIR"]
    rank = f".rank{worker.rank}" if worker.tp_size > 1 else ""
    np.savez(os.path.join(folder, f"{kvwire_id}.{side}{rank}.npz"), **arrays)


class WitnessWorker(ConnectorWorker):
    def wait_for_save(self) -> None:
        for push in self._pushes:
            _write(self, push.plan.kvwire_id, "prefill", held_bytes(self, push.plan.block_ids, push.plan.num_tokens))
        super().wait_for_save()

    def land(self, plan, layers) -> None:
        super().land(plan, layers)
        arrays = held_bytes(self, plan.block_ids, plan.num_tokens)
        arrays["first_loaded_token"] = np.array([plan.first])
        _write(self, plan.kvwire_id, "decode", arrays)


class WitnessConnector(KVWireConnector):
    worker_class = WitnessWorker
