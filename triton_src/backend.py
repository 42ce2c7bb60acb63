"""Registers the Triton kernels with the core registry (none yet: see the Triton backend issue)."""
