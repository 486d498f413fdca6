"""The connector's scheduler half: which requests push or load, which blocks, and when.

Prefill side: a request with ``do_remote_decode`` stops one prompt token short on a
hybrid model (the decode side computes the last token from the state after the one
before, as vLLM's own connectors do), and in the step where its prefill completes the
worker is told to push it: every layer's blocks and the linear-attention state slot.
Its blocks are freed as soon as it finishes, since the worker has copied what it sends.

Decode side: a request with ``do_remote_prefill`` and a kvwire request id claims the
pushed tokens beyond what it has cached itself as an asynchronous load; the worker reports
it finished once every layer arrived verified and sits in this instance's own blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ConnectorConfig
from .params import LoadReport, PushTarget, new_request_id, push_target, to_dict

log = logging.getLogger(__name__)

UNPAIRABLE_FOR_S = 30.0  # how long a decode instance refused at the probe is not tried again


@dataclass
class SendPlan:
    """Push one request in this step (its prefill completes here)."""

    req_id: str
    kvwire_id: str
    address: str
    block_ids: tuple[list[int], ...]
    num_tokens: int


@dataclass
class LoadPlan:
    """Land one pushed request into these blocks: its tokens ``first..num_tokens-1``."""

    req_id: str
    kvwire_id: str
    block_ids: tuple[list[int], ...]
    first: int
    num_tokens: int
    address: str | None = None  # the decode address the push was sent to, if known
    error: str | None = None  # the prefill side already knows there is no push: fail the load at once
    prefill_tp: int | None = None  # the prefill instance's TP size (None: this instance's)


@dataclass
class StepPlan:
    """What the worker does this step (vLLM's KVConnectorMetadata for kvwire)."""

    connect: list[str] = field(default_factory=list)  # decode addresses to dial ahead of a push
    sends: list[SendPlan] = field(default_factory=list)
    loads: list[LoadPlan] = field(default_factory=list)
    releases: list[tuple[str, int | None]] = field(default_factory=list)  # pushes nobody will load (kvwire id, prefill TP)


@dataclass
class _Producing:
    target: PushTarget
    num_tokens: int
    seen: bool = False
    sent: bool = False


class ConnectorScheduler:
    def __init__(self, config: ConnectorConfig, vllm_config, kv_cache_config, role: str):
        self.config = config
        self.role = role
        self.has_state_layers = kv_cache_config.has_mamba_layers
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.kv_manager = None  # bound by the connector (bind_kv_cache_manager)
        transfer = vllm_config.kv_transfer_config
        self.recompute_failures = getattr(transfer, "kv_load_failure_policy", "recompute") == "recompute"
        self._producing: dict[str, _Producing] = {}
        self._loading: dict[str, LoadPlan] = {}
        self._reports: dict[str, LoadReport] = {}
        self._unpairable: dict[str, tuple[str, float]] = {}  # decode address -> (why, when learnt)
        self._plan = StepPlan()

    # -- prefill side ----------------------------------------------------------------------

    def backoff(self) -> int:
        """Prompt tokens the decode side computes itself: 1 where linear-attention state
        is moved (it needs the state after token N-1 to compute token N), else 0."""
        return 1 if self.has_state_layers else 0

    def on_new_request(self, request) -> None:
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_decode"):
            return
        if self.role == "kv_consumer":  # runs as a plain request; its answer carries no push parameters
            log.error("request %s: do_remote_decode sent to a kv_consumer instance; nothing is pushed",
                      request.request_id)
            return
        try:
            target = push_target(params) or PushTarget()
        except ValueError as exc:
            target = PushTarget(error=str(exc))
        target.decode = target.decode or self.config.decode
        refused = self._unpairable.get(target.decode)
        if refused is not None and target.error is None:
            if time.monotonic() - refused[1] < UNPAIRABLE_FOR_S:
                target.error = f"this prefill instance cannot push to the decode instance at {target.decode}: {refused[0]}"
            else:  # it may have been fixed: probe it again
                del self._unpairable[target.decode]
        target.request_id = target.request_id or new_request_id(request.request_id)
        if target.decode is None and target.error is None:
            target.error = ("no decode address: the prefill request's kv_transfer_params['kvwire']['decode'] "
                            "is missing and the connector has no 'decode' option")
            log.error("request %s: %s", request.request_id, target.error)
        backoff = self.backoff()
        if request.prompt_token_ids is None and target.error is None:
            target.error = "prompt embeddings are not pushed by kvwire (send token ids)"
        if (backoff and request.prompt_token_ids is not None and request.num_prompt_tokens > backoff
                and not params.get("_kvwire_truncated")):
            # Compute (and push) the state after token N-1: drop the prompt's last token.
            del request.prompt_token_ids[-backoff:]
            del request._all_token_ids[-backoff:]
            request.num_prompt_tokens -= backoff
            request.max_tokens = 1
            params["_kvwire_truncated"] = True
        target.num_tokens = request.num_prompt_tokens
        target.prefill_tp = self.tp_size
        self._producing[request.request_id] = _Producing(target, request.num_prompt_tokens)

    def _schedule_sends(self, scheduler_output) -> None:
        scheduled = [(r.req_id, r.num_computed_tokens) for r in scheduler_output.scheduled_new_reqs]
        cached = scheduler_output.scheduled_cached_reqs
        scheduled += list(zip(cached.req_ids, cached.num_computed_tokens))
        for req_id, computed in scheduled:
            state = self._producing.get(req_id)
            if state is None or state.sent or state.target.error:
                continue
            if not state.seen:
                state.seen = True
                self._plan.connect.append(state.target.decode)
            if computed + scheduler_output.num_scheduled_tokens[req_id] >= state.num_tokens:
                state.sent = True
                if state.num_tokens == 0:
                    continue
                self._plan.sends.append(SendPlan(
                    req_id, state.target.request_id, state.target.decode,
                    tuple(list(ids) for ids in self.kv_manager.get_block_ids(req_id)), state.num_tokens,
                ))

    def unpairable(self, address: str, why: str) -> None:
        """A worker found that this instance cannot push to ``address`` at all."""
        self._unpairable[address] = (why, time.monotonic())

    # -- decode side -----------------------------------------------------------------------

    def _pushed_tokens(self, request, target: PushTarget) -> int:
        if target.num_tokens is not None:
            return target.num_tokens
        remote = (request.kv_transfer_params or {}).get("remote_num_tokens")
        if remote is not None:
            return int(remote)
        return max(0, request.num_prompt_tokens - self.backoff())

    def _load_target(self, request) -> PushTarget | None:
        """The push a decode request loads (None: not a kvwire push); a malformed one is
        reported on the response and the prompt computed here."""
        params = request.kv_transfer_params
        if not params or not params.get("do_remote_prefill") or self.role == "kv_producer":
            return None
        try:
            return push_target(params)
        except ValueError as exc:
            if request.request_id not in self._reports:
                log.error("request %s: %s; computing its prompt here", request.request_id, exc)
                self._reports[request.request_id] = LoadReport("", error=f"ValueError: {exc}", recomputed=True)
            return None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        target = self._load_target(request)
        if target is None or target.request_id is None:
            return 0, False  # not a kvwire push (another connector's parameters)
        pushed = min(self._pushed_tokens(request, target), request.num_prompt_tokens)
        count = pushed - num_computed_tokens
        return (count, True) if count > 0 else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        target = self._load_target(request)
        if target is None or target.request_id is None:
            return
        params = request.kv_transfer_params
        params["do_remote_prefill"] = False  # one load per request, also after a preemption
        pushed = min(self._pushed_tokens(request, target), request.num_prompt_tokens)
        report = LoadReport(target.request_id, local_tokens=pushed - num_external_tokens)
        self._reports[request.request_id] = report
        if num_external_tokens <= 0:
            self._plan.releases.append((target.request_id, target.prefill_tp))  # all cached here: drop the push
            return
        plan = LoadPlan(
            request.request_id, target.request_id,
            tuple(list(ids) for ids in self.kv_manager.get_block_ids(request.request_id)),
            pushed - num_external_tokens, pushed, target.decode, target.error, target.prefill_tp,
        )
        self._loading[request.request_id] = plan
        self._plan.loads.append(plan)

    def loaded(self, req_id: str, *, ok: bool, error: str | None, nbytes: int, seconds: float) -> None:
        """A load's outcome, as the worker reported it."""
        plan = self._loading.pop(req_id, None)
        report = self._reports.get(req_id)
        if report is None or plan is None:
            return
        if ok:
            report.loaded_tokens = plan.num_tokens - plan.first
            report.bytes, report.seconds = nbytes, seconds
        else:
            report.error = error
            report.recomputed = self.recompute_failures
            report.local_tokens = 0

    # -- both ------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output) -> StepPlan:
        self._schedule_sends(scheduler_output)
        plan, self._plan = self._plan, StepPlan()
        return plan

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        state = self._producing.pop(req_id, None)
        if state is not None:
            target = state.target
            if not state.sent and target.error is None:
                target.error = f"the prefill of request {req_id} did not complete ({request.status.name})"
                self._plan.releases.append((target.request_id, None))  # nothing is pushed
            return False, {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_num_tokens": state.num_tokens,
                "transfer_mode": "push",
                "kvwire": to_dict(target),
            }
        loading = self._loading.pop(req_id, None)
        if loading is not None:  # finished (aborted) while its KV was still on the way
            self._plan.releases.append((loading.kvwire_id, loading.prefill_tp))
        report = self._reports.pop(req_id, None)
        if report is None:
            return False, None
        return False, {"kvwire": to_dict(report)}
