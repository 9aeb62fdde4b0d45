"""The peers, each a small program run as ``python -m bench.peers.<name>``.

They are written the way their own documentation or the usual tutorial writes them, with the
same prefetch as message-proxy so that only the per-message work differs.
"""
