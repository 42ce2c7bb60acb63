"""The TileLang backend: every mHC operator forward and backward as TileLang kernels.

Serves CUDA tensors; with ``MHC_TILELANG_EMULATE=1`` it also serves CPU tensors by running
the generated CUDA source as host C++ on CPU threads (``emulate.py``; a test device, slow,
for checking the kernels' numerics where no GPU is present -- CI).
This module is the cheap probe the core imports; ``load()`` imports the kernels.
"""

import importlib.util
import os
import shutil

EMULATE_ENV = "MHC_TILELANG_EMULATE"


def emulation_enabled() -> bool:
    return os.environ.get(EMULATE_ENV, "0").strip() not in ("", "0")


def unavailable_reason(device):
    if importlib.util.find_spec("tilelang") is None:
        return "tilelang is not installed (pip install 'mhc-kernels[tilelang]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and emulation_enabled():
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            return f"{EMULATE_ENV}=1 needs a host C++20 compiler (g++ or $CXX) to build the emulated kernels"
        return None
    return (f"TileLang kernels run on CUDA devices only; got {device.type}"
            + (f" (set {EMULATE_ENV}=1 to run their generated CUDA on CPU threads, for testing)"
               if device.type == "cpu" else ""))


def load():
    from . import backend  # noqa: F401  (registers the kernels)
