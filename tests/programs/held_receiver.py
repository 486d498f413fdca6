"""A receiver that prints its address and serves until its stdin closes (or it is killed).

Arguments: backend, secret.
"""

import sys

from kvwire import Receiver
from tests.support import hybrid_layout

backend, secret = sys.argv[1:3]
rx = Receiver(hybrid_layout(), backend=backend, secret=secret.encode())
print(rx.address, flush=True)
sys.stdin.read()
