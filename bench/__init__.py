"""The benchmark suite (issue #6): message-proxy against its peers, as a program, not a test.

``uv run python -m bench [--quick] [--runs 3]`` prints a table and writes ``docs/BENCHMARKS.md``
and ``docs/benchmarks.png``. Every peer runs as its own subprocess; every figure is the median
of the runs of one invocation, and every ratio is taken against a baseline measured in that same
invocation.
"""
