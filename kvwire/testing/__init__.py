"""Helpers for testing kvwire and code built on it: fault-injecting relays (and later WAN links)."""
