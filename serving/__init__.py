"""Prefill and decode worker processes running a small hybrid-attention model, and the PrfaaS router."""
