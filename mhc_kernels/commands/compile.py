"""``mhc-kernels compile``: build every GPU kernel for real targets ahead of time; no GPU needed.

For each backend (``triton``, ``tilelang``) it calls
``mhc_kernels.<backend>_src.aot.compile_all(arch, n, C, dtype, emit_dir)``, which compiles the
backend's kernels at their default configs for one representative shape and reads registers,
spills and shared memory from ``ptxas -v``. The table lists one row per kernel and arch; the
exit status is non-zero when a kernel fails to compile, spills registers or needs more shared
memory than the arch has -- or when the toolchain (ptxas, nvcc for TileLang) is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mhc_kernels.specs import DTYPES_BY_NAME

BACKENDS = ("triton", "tilelang")


def failures(records: list[dict]) -> list[str]:
    """One line per record that makes the command fail: not compiled, over the smem limit, or spilling."""
    out = []
    for r in records:
        where = f"{r.get('backend')}:{r.get('kernel')} ({r.get('arch')})"
        if not r.get("ok"):
            out.append(f"{where} failed: {r.get('error') or 'unknown error'}")
        elif (r.get("spills") or 0) > 0:
            out.append(f"{where} spills {r['spills']} bytes of registers")
    return out


def exit_code(records: list[dict]) -> int:
    """0 when at least one kernel was built and none failed or spilled, else 1."""
    return 1 if not records or failures(records) else 0


def _status(r: dict) -> str:
    if not r.get("ok"):
        return "[red]failed[/]"
    if (r.get("spills") or 0) > 0:
        return "[red]spills[/]"
    return "[green]ok[/]"


def _num(v) -> str:
    return "-" if v is None else str(v)


def _table(records: list[dict]) -> Table:
    t = Table(title="ahead-of-time compile (registers and spills from ptxas -v)")
    for col, kw in (("backend", {}), ("kernel", {"no_wrap": True}), ("arch", {}), ("config", {}),
                    ("registers", {"justify": "right"}), ("spills", {"justify": "right"}),
                    ("smem", {"justify": "right"}), ("compile s", {"justify": "right"}), ("status", {})):
        t.add_column(col, **kw)
    for r in records:
        smem = r.get("smem_bytes")
        t.add_row(r.get("backend", "?"), r.get("kernel", "?"), r.get("arch", "?"), escape(str(r.get("config", ""))),
                  _num(r.get("registers")), _num(r.get("spills")),
                  "-" if smem is None else f"{smem / 1024:.1f} KiB",
                  "-" if r.get("seconds") is None else f"{r['seconds']:.2f}", _status(r))
    return t


def _load_aot(backend: str):
    """The backend's aot module, or (None, why not)."""
    name = f"mhc_kernels.{backend}_src.aot"
    if importlib.util.find_spec(backend) is None:
        return None, f"{backend}: not installed (pip install 'mhc-kernels[{backend}]')"
    try:
        return importlib.import_module(name), None
    except ModuleNotFoundError as e:
        if e.name == name:
            return None, f"{backend}: AOT compile not available yet"
        if e.name and e.name.split(".")[0] == backend:
            return None, f"{backend}: not installed (pip install 'mhc-kernels[{backend}]')"
        raise


def run(args) -> int:
    con = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get the full table
    # Building for a GPU never needs Triton's interpreter, and interpreter-decorated kernels
    # cannot be compiled: drop the switch while triton is not imported yet.
    if "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    from mhc_kernels import ptxas

    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    arches = args.arch or ["sm_90a"]
    unknown = [a for a in arches if a not in ptxas.ARCH_CC]
    if unknown:
        con.print(f"[red]unknown arch {', '.join(unknown)}[/]; known: {', '.join(ptxas.ARCH_CC)}")
        return 2
    if ptxas.ptxas_path() is None:
        con.print("[red]ptxas was not found on PATH[/]: compiling kernels for a GPU target needs the CUDA "
                  "toolkit's ptxas (and nvcc for TileLang); install it or add its bin/ directory to PATH.")
        return 2
    if "tilelang" in backends and shutil.which("nvcc") is None:
        con.print("[red]nvcc was not found on PATH[/]: TileLang kernels are compiled with nvcc; install the CUDA "
                  "toolkit or add its bin/ directory to PATH.")
        if args.backend != "all":
            return 2
        backends.remove("tilelang")

    dtype = DTYPES_BY_NAME[args.dtype]
    records: list[dict] = []
    notes: list[str] = []
    for backend in backends:
        aot, why = _load_aot(backend)
        if aot is None:
            notes.append(why)
            continue
        emit = None if args.emit_dir is None else os.path.join(args.emit_dir, backend)
        for arch in arches:
            try:
                recs = aot.compile_all(arch, args.n, args.hidden, dtype, emit)
            except ptxas.PtxasUnavailable as e:
                con.print(f"[red]{escape(str(e))}[/]")
                return 2
            records.extend(recs)
        if hasattr(aot, "kernel_modules"):
            skipped: list = []
            aot.kernel_modules(skipped)
            notes.extend(f"{backend}: skipped module {m} ({why})" for m, why in skipped)

    con.print(f"n={args.n}, C={args.hidden}, dtype={args.dtype}")
    if records:
        con.print(_table(records))
    for note in notes:
        con.print(f"[yellow]{escape(note)}[/]")
    bad = failures(records)
    for line in bad:
        con.print(f"[red]{escape(line)}[/]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
        con.print(f"wrote {len(records)} records to {args.json}")
    if not records:
        con.print("[red]nothing was compiled[/]")
    return exit_code(records)
