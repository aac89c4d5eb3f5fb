"""Benchmarking: run KV-cache compression methods over tasks, then summarise and report the results.

Submodules are imported on demand (``kvsieve.bench.summary``, ``kvsieve.bench.report``) so that
importing this package stays cheap.
"""
