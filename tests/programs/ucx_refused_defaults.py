"""UCX starts even where it refuses kvwire's tuned defaults (as a site's ucx.conf with a TCP
receive segment under kvwire's send segment would make it); prints "started"."""

from kvwire.transport import ucx
from kvwire.transport.ucx import hub, options

options.TUNED_DEFAULTS = {"TCP_TX_SEG_SIZE": ("1m", ("TCP_TX_SEG_SIZE",))}  # over UCX's 64k receive segment
assert ucx.tuned_defaults()
hub.Hub.get(ucx.UcxOptions())
print("started")
