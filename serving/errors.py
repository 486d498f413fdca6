"""Serving's errors: their own tree, apart from kvwire's transport errors.

A kvwire error (``KVWireError`` and its subclasses) means a KV transfer failed; the router
may recompute around it. These mean something about serving itself: a bad request, no
worker to send it to, a worker that answered with an error, a plan that cannot be made.
Catch ``ServingError`` for all of them.
"""

from __future__ import annotations


class ServingError(Exception):
    """The base of every error the serving layer raises on its own account."""


class BadRequest(ServingError, ValueError):
    """A client mistake: answered with 400 and this message."""


class UsageError(ServingError):
    """A flag's value cannot work here (a port in use): the CLI prints it as one line, exit 2."""


class LaunchError(ServingError, RuntimeError):
    """A worker exited or did not become ready in time."""


class NotAWorker(ServingError, ValueError):
    """Something answered at the URL, but not a kvwire worker (the message says what did)."""


class NoWorkerError(ServingError):
    """No worker can take the request (every pool it may go to is empty)."""


class PairRefused(ServingError):
    """No prefill worker can send KV to the decode worker: ``error_type`` names why (an
    AuthenticationError from the handshake, a layout or model mismatch)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


class UpstreamError(ServingError):
    """A worker answered with an error, or could not be reached: becomes the router's HTTP
    error with ``status`` and ``error_type``."""

    def __init__(self, status: int, error_type: str, message: str):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


class Unreachable(UpstreamError):
    """A worker that could not be reached at all (another of its pool may be tried)."""


class PlanError(ServingError, ValueError):
    """A profile, workload or plan request that the throughput model cannot evaluate."""
