"""Benchmarks: bench throughput / latency, with vLLM-shaped output."""
