"""The router's configuration: worker pools, PrfaaS clusters and their links, timeouts.

Given as a TOML file (``kvwire-serve router --config FILE``), as flags, or both (flags
add workers and override scalars). Decoded into typed msgspec structs, so a typo or a
wrong type is an error naming the field instead of a silently ignored setting::

    decode = ["http://10.0.0.5:8200"]
    prefill = ["http://10.0.0.5:8100"]          # local PD prefill workers

    [[prfaas]]
    name = "prfaas-east"
    prefill = ["http://10.1.0.7:8100"]
    egress_gbps = 100.0                          # the link's capacity, for the threshold controller
    threshold_tokens = 20236                     # t from kvwire-plan; the controller only raises it
    max_threshold_tokens = 131072
    kv_addresses = { "http://10.0.0.5:8200" = "203.0.113.5:9200" }   # decode KV as seen from there
    controller = { busy_utilization = 0.9, rtt_min_utilization = 0.1 }  # serving.policy.ThresholdConfig

    [control]
    interval_s = 0.5
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import msgspec

from kvwire.address import check_address

ENGINES = ("auto", "kvwire", "vllm", "vllm-nixl")


def url_problem(url: object) -> str | None:
    """What is wrong with ``url`` as a worker's base URL (None: nothing), in words for a user."""
    if not isinstance(url, str):
        return f"expected a URL string such as 'http://10.0.0.2:8100', got {url!r}"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return f"{url!r} is not an http:// URL (e.g. 'http://{url if '/' not in url else '10.0.0.2:8100'}')"
    try:
        parts.port
    except ValueError:
        return f"{url!r} has no valid port (1..65535)"
    if not parts.hostname:
        return f"{url!r} names no host"
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return f"{url!r}: give the worker's base URL, without a path (the router adds /v1/...)"
    return None


def check_url(url: object, what: str) -> str:
    """``url`` without a trailing slash, or ValueError naming ``what``."""
    problem = url_problem(url)
    if problem:
        raise ValueError(f"{what}: {problem}")
    return url.rstrip("/")


class PrfaasConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One PrfaaS prefill cluster, reached over a link of ``egress_gbps``."""

    name: str
    prefill: list[str]
    egress_gbps: float
    threshold_tokens: int = 0
    max_threshold_tokens: int = 1 << 20
    kv_addresses: dict[str, str] = {}
    controller: dict[str, float] = {}  # ThresholdConfig fields: busy_/idle_ levels, factors, rtt_floor_ms...

    def threshold_config(self):
        """The controller's settings (serving.policy.ThresholdConfig); ValueError names a bad key."""
        from .policy import ThresholdConfig

        fixed = {"min_tokens", "max_tokens"} & set(self.controller)
        if fixed:
            raise ValueError(f"PrfaaS cluster {self.name!r}: set {sorted(fixed)} as threshold_tokens / "
                             "max_threshold_tokens, not in [controller]")
        try:
            return ThresholdConfig(self.threshold_tokens, self.max_threshold_tokens, **self.controller)
        except TypeError as exc:
            raise ValueError(f"PrfaaS cluster {self.name!r}: [controller] has an unknown setting ({exc})") from None
        except ValueError as exc:
            raise ValueError(f"PrfaaS cluster {self.name!r}: [controller]: {exc}") from None

    def __post_init__(self) -> None:
        if not self.prefill:
            raise ValueError(f"PrfaaS cluster {self.name!r} lists no prefill worker")
        msgspec.structs.force_setattr(self, "prefill", [check_url(url, f"PrfaaS cluster {self.name!r}: prefill worker")
                                                        for url in self.prefill])
        for url, address in self.kv_addresses.items():
            check_address(address, what=f"PrfaaS cluster {self.name!r}: kv_addresses[{url!r}]")
        if self.egress_gbps <= 0:
            raise ValueError(f"PrfaaS cluster {self.name!r}: egress_gbps must be > 0, got {self.egress_gbps}")
        if not 0 <= self.threshold_tokens <= self.max_threshold_tokens:
            raise ValueError(f"PrfaaS cluster {self.name!r}: need 0 <= threshold_tokens <= max_threshold_tokens, "
                             f"got {self.threshold_tokens} and {self.max_threshold_tokens}")
        self.threshold_config()


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How often the router polls worker state and steps the threshold controllers."""

    interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"control.interval_s must be > 0, got {self.interval_s}")


class RouterConfig(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Everything the router needs; ``prefill`` are the local PD prefill workers."""

    decode: list[str] = []
    prefill: list[str] = []
    prfaas: list[PrfaasConfig] = []
    kv_fallback: str = "recompute"
    connect_timeout_s: float = 3.0
    prefill_timeout_s: float = 120.0
    token_timeout_s: float = 60.0
    control: ControlConfig = ControlConfig()
    engine: str = "auto"  # kvwire-serve workers, vLLM OpenAI servers with KVWireConnector or NixlConnector, or detect
    decode_kv: dict[str, str] = {}  # vLLM decode server URL -> its kvwire address (the connector's "listen")

    def __post_init__(self) -> None:
        for role in ("decode", "prefill"):  # stored without a trailing slash: the router appends paths
            msgspec.structs.force_setattr(self, role, [check_url(url, f"{role} worker") for url in getattr(self, role)])
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        for url, address in self.decode_kv.items():
            if url not in self.decode:
                raise ValueError(f"decode_kv names {url}, which is not a decode worker ({self.decode})")
            check_address(address, what=f"decode_kv[{url!r}]")
        if not self.decode:
            raise ValueError("the router needs at least one decode worker URL")
        if not self.prefill and not self.prfaas:
            raise ValueError("the router needs at least one prefill worker URL (local or in a PrfaaS cluster)")
        if self.kv_fallback not in ("recompute", "error"):
            raise ValueError(f"kv_fallback must be 'recompute' or 'error', got {self.kv_fallback!r}")
        names = [c.name for c in self.prfaas]
        if len(set(names)) != len(names):
            raise ValueError(f"PrfaaS cluster names must be unique, got {names}")
        for name in ("connect_timeout_s", "prefill_timeout_s", "token_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        roles: dict[str, str] = {}
        pools = [("decode", self.decode), ("prefill", self.prefill)]
        pools += [(f"prfaas {c.name!r}", c.prefill) for c in self.prfaas]
        for role, urls in pools:
            for url in urls:
                if url in roles:
                    raise ValueError(f"worker {url} is listed twice ({roles[url]} and {role}): "
                                     "each worker has one role")
                roles[url] = role
        for cluster in self.prfaas:
            unknown = sorted(set(cluster.kv_addresses) - set(self.decode))
            if unknown:
                raise ValueError(f"PrfaaS cluster {cluster.name!r}: kv_addresses names {unknown}, "
                                 f"which are not decode workers ({self.decode})")

    @property
    def prefill_urls(self) -> tuple[str, ...]:
        """Every prefill worker, local first."""
        return (*self.prefill, *(url for c in self.prfaas for url in c.prefill))


def load(path: str | Path) -> RouterConfig:
    """The config in a TOML file; ValueError naming the file and the bad field."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"router config {path}: cannot read it ({exc.strerror})") from None
    try:
        return msgspec.toml.decode(data, type=RouterConfig)
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise ValueError(f"router config {path}: {exc}") from None


def merge(base: RouterConfig | None, **overrides) -> RouterConfig:
    """``base`` with flag values applied: lists extend it, other values replace; None is unset."""
    fields = msgspec.structs.asdict(base) if base is not None else {}
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            fields[name] = [*fields.get(name, []), *value]
        else:
            fields[name] = value
    try:
        return msgspec.convert(msgspec.to_builtins(fields), RouterConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(f"router config: {exc}") from None
