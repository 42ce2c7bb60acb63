"""``mhc-kernels info``: versions, devices, backends (available or why not), config locations.

Works with no GPU and without triton/tilelang installed: versions come from package
metadata, so neither toolchain is imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

import mhc_kernels as mk
from mhc_kernels import registry, tuned


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def devices() -> list[tuple[str, str]]:
    out = [("cpu", f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical cores")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                                     f"{p.total_memory / 2**30:.0f} GiB"))
    return out


def run(args) -> int:
    con = Console()
    t = Table(title=f"mhc-kernels {mk.__version__}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("python", platform.python_version())
    cuda = torch.version.cuda or "cpu build"
    t.add_row("torch", f"{torch.__version__} (CUDA {cuda})")
    t.add_row("triton", _version("triton"))
    t.add_row("tilelang", _version("tilelang"))
    nvcc = shutil.which("nvcc")
    t.add_row("nvcc", nvcc or "not found (needed to compile TileLang kernels)")
    t.add_row("eager fast path", "on" if mk.eager_fastpath_enabled() else "off (MHC_KERNELS_EAGER_FASTPATH=0)")
    try:
        forced = registry.forced_backend()
    except mk.BackendError as e:
        forced = f"invalid: {e}"
    t.add_row("forced backend", forced or f"none (automatic; set {registry.ENV_VAR} or use_backend to force)")
    t.add_row("user configs", f"{tuned.user_config_dir()} (${tuned.CONFIG_DIR_ENV}; takes precedence)")
    t.add_row("bundled configs", tuned.bundled_config_dir())
    con.print(t)

    b = Table(title="backends by device (in priority order)")
    for col in ("device", "", "backend", "available", "why not"):
        b.add_column(col)
    for dev, desc in devices():
        for i, (name, st) in enumerate(mk.available_backends(dev).items()):
            b.add_row(dev if i == 0 else "", desc if i == 0 else "", name,
                      "[green]yes[/]" if st.available else "[red]no[/]", escape(st.reason))
    con.print(b)
    return 0
