"""The Triton backend: every mHC operator forward and backward as Triton kernels.

Serves CUDA tensors; with ``TRITON_INTERPRET=1`` set before triton is imported it
also serves CPU tensors (Triton's interpreter), which is how CI runs these kernels.
This module is the cheap probe the core imports; ``load()`` imports the kernels.
"""

import importlib.util
import os


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def unavailable_reason(device):
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'mhc-kernels[triton]')"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return ("Triton kernels need a CUDA device; set TRITON_INTERPRET=1 before triton is imported "
                "to run them on CPU tensors")
    return f"Triton kernels do not run on {device.type} tensors"


def load():
    from . import backend  # noqa: F401  (registers the kernels)
