"""Benchmarks behind `mlkv bench`: each measures mlkv against baselines run in the same process and run.

`store_bench` times batched `get`/`update` of the store's engines against numpy in-memory gathers (the
memory limit) and memory-mapped flat files (the disk limit). `keys` draws the key batches; `timing` holds
the timing loop and the page-cache controls that make "warm" and "cold" mean something precise.
"""
