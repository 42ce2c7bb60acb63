"""The TileLang backend: every mHC operator forward and backward as TileLang kernels (CUDA only).

This module is the cheap probe the core imports; ``load()`` imports the kernels.
"""

import importlib.util


def unavailable_reason(device):
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed (pip install 'mhc-kernels[tilelang]')"
    if device.type != "cuda":
        return f"TileLang kernels run on CUDA devices only; got {device.type}"
    return None


def load():
    from . import backend  # noqa: F401  (registers the kernels)
