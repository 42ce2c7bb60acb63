"""Latency and bandwidth benchmarks and roofline reports."""
