"""Opens a request, sends its first layer, says "sent" and holds the rest until its stdin
closes (or it is killed): a sender that dies mid-transfer.

Arguments: receiver address, backend, secret, request id.
"""

import sys

from kvwire import Sender
from tests.support import hybrid_layout, random_kv

address, backend, secret, request_id = sys.argv[1:5]
layout = hybrid_layout()
tx = Sender(layout, address, backend=backend, secret=secret.encode(), streams=2)
xfer = tx.open(request_id, 64)
xfer.send_layer(0, random_kv(layout, 64)[0])
print("sent", flush=True)
sys.stdin.read()
