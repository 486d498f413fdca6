"""Starts an emulated WAN link, prints its two namespaces and holds them until its stdin
closes (or it is killed: the link's relays must then clean up by themselves)."""

import sys

from perf.wanlink import LinkSpec, WanLink

link = WanLink(LinkSpec(rate_mbit=100, rtt_ms=2)).start()
print(" ".join(link.namespaces.values()), flush=True)
sys.stdin.read()
