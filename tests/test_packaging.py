"""Packaging and command-line checks: what a wheel installs, and that the CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{proc.stdout}\n{proc.stderr}")
    (whl,) = out.glob("mhc_kernels-*.whl")
    return whl


def test_wheel_installs_only_under_mhc_kernels(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"mhc_kernels"}, f"unexpected top-level entries: {sorted(top - dist_info)}"


def test_wheel_maps_every_folder_as_a_subpackage(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for sub in ("reference", "triton_src", "tilelang_src", "autotune", "bench", "commands"):
        assert f"mhc_kernels/{sub}/__init__.py" in names, sub
    assert "mhc_kernels/reference/oracle.py" in names
    assert "mhc_kernels/tilelang_src/cuda_emu.h" in names, "the TileLang CPU emulator needs its header"
    assert not any(n.startswith("mhc_kernels/tests") for n in names)


def test_wheel_declares_extras_and_console_script(wheel):
    z = zipfile.ZipFile(wheel)
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
    for extra in ("triton", "tilelang", "dev"):
        assert f"Provides-Extra: {extra}" in text
    # the core must not drag in GPU toolchains
    core = [line for line in text.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert not any("triton" in line or "tilelang" in line for line in core), core
    ep = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "mhc-kernels = mhc_kernels.cli:main" in z.read(ep).decode()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "mhc_kernels", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT.parent, timeout=300)


def test_cli_info_runs_without_gpu():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    for word in ("mhc-kernels", "torch", "reference", "triton", "tilelang", "configs"):
        assert word in proc.stdout, (word, proc.stdout)


def test_cli_example_forward_backward_checks_pass():
    proc = _cli("example", "--tokens", "33", "--hidden", "96", "--repeats", "1", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "d residual" in proc.stdout


def test_cli_rejects_unknown_command():
    proc = _cli("no-such-command")
    assert proc.returncode != 0
    assert "no-such-command" in proc.stderr
