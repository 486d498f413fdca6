"""Prefill and decode worker processes running a small hybrid-attention model, and the PrfaaS router.

Workers (``prefill.py``, ``decode.py``) and the router (``router/``) speak the typed
messages of ``protocol.py`` over HTTP; serving's errors are ``errors.py``'s, apart from
kvwire's transport errors. The router keeps a picture of its workers (``fleet.py``,
``identify.py``) and routes by ``policy.py``; ``planner/`` is the PrfaaS throughput model
behind ``kvwire-plan``; ``cli.py`` (``kvwire-serve``) starts any of them.
"""
