"""Backend registry: availability with reasons, forcing by context manager and environment."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mhc_kernels as mk
from mhc_kernels import BackendError
from mhc_kernels.registry import ENV_VAR, forced_backend


def _post_args():
    return torch.randn(3, 8), torch.randn(3, 2, 8), torch.rand(3, 2), torch.rand(3, 2, 2)


# why TileLang cannot serve CPU tensors here: it runs on CUDA only -- or, without the package, that it is not
# installed (with the pip command)
_TILELANG_REASON = ("CUDA" if importlib.util.find_spec("tilelang") is not None
                    else "tilelang is not installed (pip install 'mhc-kernels[tilelang]')")


def test_available_backends_lists_every_backend_with_reason():
    st = mk.available_backends("cpu")
    assert set(st) == set(mk.BACKENDS)
    assert st["reference"].available and st["reference"].reason == ""
    assert not st["tilelang"].available and _TILELANG_REASON in st["tilelang"].reason
    assert list(st)[0] == "reference"  # CPU priority order
    if torch.cuda.is_available():
        assert list(mk.available_backends("cuda"))[:2] == ["tilelang", "triton"]


def test_forcing_a_backend_that_cannot_serve_raises_naming_backend_op_and_reason():
    with mk.use_backend("tilelang"):
        with pytest.raises(BackendError) as e:
            mk.mhc_post(*_post_args())
    msg = str(e.value)
    assert "mhc.post" in msg and "'tilelang'" in msg and _TILELANG_REASON in msg and "n=2, C=8" in msg


def test_forcing_reference_works_and_nests():
    with mk.use_backend("tilelang"):
        with mk.use_backend("reference"):
            assert forced_backend() == "reference"
            mk.mhc_post(*_post_args())
        assert forced_backend() == "tilelang"
    assert forced_backend() is None


def test_unknown_backend_names():
    with pytest.raises(BackendError, match="unknown backend"):
        with mk.use_backend("cuda"):
            pass


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "tilelang")
    with pytest.raises(BackendError, match="'tilelang' is forced"):
        mk.mhc_post(*_post_args())
    with mk.use_backend(None):  # automatic selection overrides the environment
        mk.mhc_post(*_post_args())
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(BackendError, match="MHC_KERNELS_BACKEND='nonsense' is not a backend"):
        mk.mhc_post(*_post_args())
    monkeypatch.setenv(ENV_VAR, "")
    mk.mhc_post(*_post_args())


def test_float64_is_reference_only():
    x = torch.randn(2, 2, 4, dtype=torch.float64)
    out = mk.pre_apply_mix(x, torch.rand(2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64
    with mk.use_backend("tilelang"), pytest.raises(BackendError):
        mk.pre_apply_mix(x, torch.rand(2, 2, dtype=torch.float64))


def test_import_does_not_load_gpu_toolchains():
    code = ("import sys, torch, mhc_kernels as mk\n"
            "mk.mhc_post(torch.randn(2, 8), torch.randn(2, 2, 8), torch.rand(2, 2), torch.rand(2, 2, 2))\n"
            "mk.available_backends('cpu')\n"
            "bad = [m for m in ('triton', 'tilelang') if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", ENV_VAR)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
