"""The backends that run on CPU, as pytest parameters for the ``backend`` fixture (``conftest.py``):
the reference; Triton under its interpreter; TileLang under the CPU emulator."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch


def _backend_params():
    out = [pytest.param("reference", id="reference")]
    triton_ok = importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
    out.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not triton_ok, reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by conftest without a GPU)")))
    tl_ok = importlib.util.find_spec("tilelang") is not None and shutil.which(os.environ.get("CXX", "g++"))
    out.append(pytest.param("tilelang", id="tilelang", marks=pytest.mark.skipif(
        not tl_ok, reason="the TileLang emulator needs tilelang and a host C++ compiler")))
    return out


BACKENDS = _backend_params()
