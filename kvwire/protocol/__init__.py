"""The protocol core, without I/O: what a request is and when it is due, as plain objects.

Nothing here touches a socket, a thread or a transport (tests/test_architecture.py keeps
it so): the sending and receiving sides both cut a request by the same ``RequestPlan``,
and read time from a ``Clock`` a test can replace. Later stages move the handshake, the
state machines, deadlines and the memory budget here, in the spirit of h11/httpcore.
"""

from .clock import MONOTONIC, Clock, FakeClock
from .plan import RequestPlan, SegmentMap

__all__ = ["MONOTONIC", "Clock", "FakeClock", "RequestPlan", "SegmentMap"]
