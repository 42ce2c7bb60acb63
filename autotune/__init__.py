"""Autotuning: config search spaces, the tuner and the per-GPU config store."""
