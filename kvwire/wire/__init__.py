"""The kvwire wire protocol: msgspec messages and length-prefixed framing, no sockets."""
