"""The bottom layer, imported by every other package and importing none of them.

``settings`` (the environment, read once at start-up), ``terms`` (the contract's vocabulary), ``errors`` (the
exceptions that carry a status), ``outcome`` (one request's result, across the hop from the runner), ``asgi`` (the
ASGI types and the one body reader) and ``bentoml_seam`` (the only module that touches BentoML below its public API).
"""
