"""Registers the TileLang kernels with the core registry (none yet: see the TileLang backend issue)."""
