"""Resource usage of compiled GPU kernels, read from ``ptxas -v`` (no GPU needed).

Both GPU backends produce PTX (Triton directly, TileLang through nvcc). Running the
machine's ``ptxas -v`` on it reports, per entry function, the registers per thread,
spill stores/loads, stack frame and static shared memory; :func:`resources` parses
that. Shared-memory limits per architecture are in :data:`SMEM_LIMIT_BYTES`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

# Max dynamic shared memory per block (opt-in), bytes.
SMEM_LIMIT_BYTES = {
    "sm_80": 163 * 1024,
    "sm_86": 99 * 1024,
    "sm_89": 99 * 1024,
    "sm_90": 227 * 1024,
    "sm_90a": 227 * 1024,
    "sm_100": 227 * 1024,
    "sm_100a": 227 * 1024,
}
ARCH_CC = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_90a": 90, "sm_100": 100, "sm_100a": 100}


class PtxasUnavailable(RuntimeError):
    pass


@dataclass
class KernelResources:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    smem_bytes: int  # static shared memory as reported by ptxas

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def ptxas_path() -> Optional[str]:
    return shutil.which("ptxas")


def parse(text: str) -> list[KernelResources]:
    """Parse ``ptxas -v`` output into one record per entry function."""
    out: list[KernelResources] = []
    cur: Optional[dict] = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = dict(name=m.group(1), registers=0, spill_stores=0, spill_loads=0, stack_bytes=0, smem_bytes=0)
            out.append(cur)  # type: ignore[arg-type]
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["stack_bytes"], cur["spill_stores"], cur["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem_bytes"] = int(s.group(1)) if s else 0
    return [KernelResources(**d) for d in out]  # type: ignore[arg-type]


def resources(ptx: str, arch: str) -> list[KernelResources]:
    """Assemble ``ptx`` for ``arch`` (e.g. ``sm_90a``) with ``ptxas -v``; one record per kernel."""
    exe = ptxas_path()
    if exe is None:
        raise PtxasUnavailable("ptxas was not found on PATH; install the CUDA toolkit (nvcc/ptxas) to compile "
                               "kernels without a GPU")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([exe, "-v", f"-arch={arch}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {proc.stderr.strip()[-2000:]}")
    return parse(proc.stdout + proc.stderr)
