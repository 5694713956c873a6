"""Peer comparison benchmark (`python benchmarks/run.py`): models, tool drivers, read-back, tables.

Kept import-free so that `python -m benchmarks.peerbench.driver` (the timed subprocess) loads
nothing but what the tool it runs needs.
"""
