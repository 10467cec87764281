"""Data: source layouts and shard formats (plain Python), ``prepare`` and streaming (Ray Data)."""
