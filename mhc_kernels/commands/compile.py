"""``mhc-kernels compile``: build every GPU kernel for real targets ahead of time; no GPU needed.

For each backend (``triton``, ``tilelang``) it calls
``mhc_kernels.<backend>_src.aot.compile_all(arch, n, C, dtype, emit_dir)``, which compiles the
backend's kernels and reads registers, spills and shared memory from ``ptxas -v``: Triton's at
their default configs for one representative shape; TileLang's exactly as the run time keys
them for ``--tokens`` (every op forward and backward replayed on CPU with stub kernels,
``tilelang_src/runtime_keys.py``), so TileLang's disk cache then holds what a GPU run with
those shapes launches.

``--fill-cache --for selftest|gpu-tests|check|bench`` only builds (no ``ptxas -v``): the
TileLang kernels that run will ask for, into TileLang's kernel cache, for an offline GPU
machine to reuse (copy ``$TILELANG_CACHE_DIR`` there); ``--arch emulated`` fills the CPU
emulator's cache instead (what ``MHC_TILELANG_EMULATE=1`` runs reuse). The table lists one row per kernel and arch; the
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
import time

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


def _build_chunk(keys_json: list, target) -> list:
    """Worker of ``--jobs``: build a share of the keys (a separate process: TileLang compiles hold the GIL)."""
    from mhc_kernels.tilelang_src import runtime_keys

    return runtime_keys.build([runtime_keys.Key.from_json(d) for d in keys_json], target)


def fill_cache(args, con) -> int:
    """``--fill-cache``: record the run's TileLang keys, build each for the target. Exit 0 when every build
    succeeded, 1 when one failed, 2 when the toolchain is missing."""
    if importlib.util.find_spec("tilelang") is None:
        con.print("[red]tilelang is not installed[/] (pip install 'mhc-kernels[tilelang]'): nothing to fill")
        return 2
    from mhc_kernels.tilelang_src import common, runtime_keys

    arches = args.arch or ["sm_90a"]
    if len(arches) != 1:
        con.print("[red]--fill-cache builds for one --arch at a time[/] (a cache serves one GPU arch)")
        return 2
    arch = arches[0]
    emulated = arch == "emulated"
    dry = bool(getattr(args, "dry_run", False))
    if dry:
        pass
    elif emulated:
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            con.print("[red]the emulator's kernels are built with g++ (or $CXX), which was not found[/]")
            return 2
    elif shutil.which("nvcc") is None:
        con.print("[red]nvcc was not found on PATH[/]: TileLang kernels are compiled with nvcc; install the CUDA "
                  "toolkit or add its bin/ directory to PATH.")
        return 2
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    sms = args.sms or (common.num_sms() if emulated else runtime_keys.ARCH_SMS[arch])
    t0 = time.perf_counter()
    with con.status(f"recording the TileLang kernels of '{args.plan}' ..."):
        keys, notes = runtime_keys.record_plan(args.plan, sms, device_cases="cpu" if emulated else "cuda",
                                               ops=args.ops)
    con.print(f"{len(keys)} TileLang kernels for '{args.plan}' on {arch} ({sms} SMs), recorded in "
              f"{time.perf_counter() - t0:.1f} s")
    if args.keys_out:
        runtime_keys.save(args.keys_out, keys)
        con.print(f"wrote the keys to {args.keys_out}")
    if dry:
        by_kernel: dict[str, int] = {}
        for k in keys:
            by_kernel[k.kernel] = by_kernel.get(k.kernel, 0) + 1
        con.print("dry run, nothing built: " + ", ".join(f"{name} x{c}" for name, c in sorted(by_kernel.items())))
        return 0
    target = common.EMULATED if emulated else {"kind": "cuda", "arch": arch}
    t1 = time.perf_counter()
    jobs = max(1, int(args.jobs or 1))
    if jobs == 1 or len(keys) < 2:
        with con.status("building ...") as st:
            records = runtime_keys.build(keys, target, progress=lambda i, k, s: st.update(
                f"building {i + 1}/{len(keys)}: {k.kernel} ({s:.1f} s)"))
    else:
        import concurrent.futures
        import multiprocessing

        chunks = [[k.as_json() for k in keys[i::jobs]] for i in range(jobs)]
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
            records = [r for part in ex.map(_build_chunk, chunks, [target] * jobs) for r in part]
    bad = [r for r in records if not r["ok"]]
    for r in bad:
        con.print(f"[red]{escape(r['kernel'])} failed[/]: {escape(str(r['error']))[:600]}")
    for r in records:
        if r.get("sync_warnings"):
            con.print(f"[yellow]{escape(r['kernel'])} {escape(json.dumps(r['key']['config']))}: TileLang could not "
                      f"place a barrier between two shared-memory accesses (a possible race): "
                      f"{escape(r['sync_warnings'][0])}[/]")
    for note in notes:
        con.print(f"[yellow]{escape(note)}[/]")
    where = (os.path.join(os.environ.get("MHC_KERNELS_CACHE") or "~/.cache/mhc_kernels", "tilelang_emu")
             if emulated else os.environ.get("TILELANG_CACHE_DIR") or "~/.tilelang/cache")
    con.print(f"built {len(records) - len(bad)}/{len(records)} kernels in {time.perf_counter() - t1:.1f} s "
              f"into {where}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)
    return 1 if bad else 0


def run(args) -> int:
    con = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get the full table
    if getattr(args, "fill_cache", False):
        return fill_cache(args, con)
    if "emulated" in (args.arch or []):
        con.print("[red]--arch emulated is a target of --fill-cache only[/] (the emulator has no registers to report)")
        return 2
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
                extra = {} if backend != "tilelang" else {
                    k: v for k, v in (("tokens", tuple(args.tokens or ())), ("sms", args.sms)) if v}
                recs = aot.compile_all(arch, args.n, args.hidden, dtype, emit, **extra)
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
