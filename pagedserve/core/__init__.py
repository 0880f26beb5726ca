"""Scheduling core: requests, block pool, KV cache manager, prefix hashing, scheduler."""
