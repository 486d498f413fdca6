"""The protocol core, without I/O: what a request is and when it is due, and the handshake,
as plain objects.

Nothing here touches a socket, a thread or a transport (tests/test_architecture.py keeps
it so): the sending and receiving sides both cut a request by the same ``RequestPlan``,
read time from a ``Clock`` a test can replace, run the handshake as two state machines
fed decoded messages (``kvwire.handshake`` drives them over a connection), and keep their
books in ``sending`` and ``receiving``: the drivers (``kvwire.sender``,
``kvwire.receiver``) do the I/O and carry out what these decide, in the spirit of
h11/httpcore.
"""

from .clock import MONOTONIC, Clock, FakeClock
from .handshake import Accepted, ClientHandshake, ServerHandshake, Step
from .plan import RequestPlan, SegmentMap

__all__ = ["MONOTONIC", "Accepted", "ClientHandshake", "Clock", "FakeClock", "RequestPlan", "SegmentMap",
           "ServerHandshake", "Step"]
