"""kvwire benchmarks: each prints JSON; none runs in the unit tests."""
