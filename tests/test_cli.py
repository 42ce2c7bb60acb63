"""The command line's edges: a missing CUDA device, bad sizes, --version, and reasons that contain brackets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mhc_kernels as mk

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "mhc_kernels", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="about a machine without CUDA")
@pytest.mark.parametrize("command", [["check"], ["example"], ["bench", "--quick"]])
def test_cuda_requested_without_a_gpu_is_one_line_and_exit_2(command):
    p = _cli(*command, "--device", "cuda")
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [f"mhc-kernels {command[0]}: no CUDA device (this torch is a CPU build); "
                                             f"run with --device cpu"]
    assert "Traceback" not in p.stderr and p.stdout == ""


@pytest.mark.parametrize("flag", ["--tokens", "--n", "--hidden"])
def test_example_refuses_non_positive_sizes_with_a_message(flag):
    p = _cli("example", "--device", "cpu", flag, "0")
    assert p.returncode == 2 and f"mhc-kernels example: {flag} must be >= 1; got 0" in p.stderr
    assert "Traceback" not in p.stderr


def test_version():
    p = _cli("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"mhc-kernels {mk.__version__}"


def test_reasons_with_brackets_are_printed_literally(monkeypatch, capsys):
    """rich reads "[tilelang]" as markup and drops it; the commands escape every reason they print."""
    from mhc_kernels import registry
    from mhc_kernels.commands import info

    why = "tilelang is not installed (pip install 'mhc-kernels[tilelang]')"
    real = registry.available_backends

    def fake(device=None):
        out = real(device)
        out["tilelang"] = registry.BackendStatus("tilelang", False, why)
        return out

    monkeypatch.setattr(mk, "available_backends", fake)
    monkeypatch.setenv("COLUMNS", "400")
    assert info.run(None) == 0
    assert "mhc-kernels[tilelang]" in capsys.readouterr().out
