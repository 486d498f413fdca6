"""Adapters that put kvwire inside serving engines (``kvwire.integrations.vllm``).

Each engine adapter imports its engine lazily; ``import kvwire`` never needs one.
"""
