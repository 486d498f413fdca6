"""Helpers for testing kvwire and code built on it: a fault-injecting relay and emulated WAN links."""
