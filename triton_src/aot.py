"""Ahead-of-time compilation of the Triton kernels for real GPU targets, without a GPU.

Every Triton kernel module in this package that defines ``aot_specs(n, C, dtype)`` (see
:mod:`.common`) lists its kernels at their default configs for a representative shape.
:func:`compile_spec` builds one of them with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", cc, 32))`` and measures the result:

* registers per thread and spill bytes from the machine's ``ptxas -v`` run on the
  generated PTX (:func:`mhc_kernels.ptxas.resources`);
* shared memory from Triton's metadata (``shared``: the dynamic shared memory the kernel
  launches with) plus any static shared memory ptxas reports, checked against
  :data:`mhc_kernels.ptxas.SMEM_LIMIT_BYTES` for the arch.

The PTX is emitted at the highest PTX ISA version the machine's ptxas accepts (Triton's
bundled ptxas may be newer), so the measured binary is the one that ptxas can build.

Signature strings are Triton's (``"*bf16"``, ``"i32"``, ``"constexpr"``, ...); an integer may
carry a ``":16"`` suffix (``"i32:16"``) meaning "divisible by 16", the specialisation the JIT
makes at launch, so the AOT build vectorises like the real one. Pointer arguments are
always hinted as 16-byte aligned (as torch allocations are).

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` (Triton's own ``tl.zeros``, ``tl.sum``, ... included)
yields interpreter functions, which cannot be compiled. In such a process the kernels are
built in one child Python process without the interpreter (``python -m
mhc_kernels.triton_src.aot``), which receives the specs (the kernel named by module and
function name) on stdin and answers with the records as JSON.

``seconds`` is the wall time of ``triton.compile``; it is close to zero when Triton's
on-disk cache (``TRITON_CACHE_DIR``) already holds the kernel.

Result records (one per kernel): ``{"backend": "triton", "kernel", "arch", "config" (str),
"registers", "spills", "smem_bytes", "seconds", "ok", "error"}``; ``ok`` is False when the
compile failed or the kernel needs more shared memory than the arch has.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import pkgutil
import re
import subprocess
import sys
import time
import types
import warnings
from typing import Optional

import torch

from mhc_kernels import ptxas

from . import common

_NOT_KERNEL_MODULES = {"common", "backend", "aot"}
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


# -- kernel discovery ----------------------------------------------------------------------------
def kernel_modules(skipped: Optional[list] = None) -> list:
    """Every Triton kernel module of this package that defines ``aot_specs``, imported.

    A module that cannot be imported only because a sibling kernel module it needs does
    not exist yet is skipped, with ``(module, reason)`` appended to ``skipped``; any other
    import error propagates.
    """
    pkg = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                   if m.name not in _NOT_KERNEL_MODULES and not m.name.startswith("_"))
    present = set(m.name for m in pkgutil.iter_modules(pkg.__path__))
    mods = []
    for name in names:
        try:
            mod = importlib.import_module(f"{__package__}.{name}")
        except ImportError as e:
            missing = _missing_sibling(e, present)
            if missing is None:
                raise
            if skipped is not None:
                skipped.append((name, f"needs triton_src.{missing}, which does not exist yet"))
            continue
        if hasattr(mod, "aot_specs"):
            mods.append(mod)
    return mods


def _missing_sibling(e: ImportError, present: set) -> Optional[str]:
    """The name of a sibling module of this package that ``e`` says is missing, else None."""
    prefix = f"{__package__}."
    if isinstance(e, ModuleNotFoundError) and e.name and e.name.startswith(prefix):
        sub = e.name[len(prefix):].split(".")[0]
        return sub if sub not in present else None
    m = re.search(r"cannot import name '(\w+)' from '([\w.]+)'", str(e))
    if m and m.group(2) == __package__ and m.group(1) not in present:
        return m.group(1)
    return None


def collect_specs(n: int, C: int, dtype, skipped: Optional[list] = None) -> list[common.AotSpec]:
    """The ``aot_specs`` of every kernel module, in module order."""
    dtype = _dtype(dtype)
    specs = []
    for mod in kernel_modules(skipped):
        specs.extend(mod.aot_specs(n, C, dtype))
    return specs


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use bf16, fp16 or fp32") from None


# -- ptxas / PTX version ----------------------------------------------------------------------------
def _system_ptx_version() -> Optional[int]:
    """Highest PTX ISA version (Triton's encoding, e.g. 90 for 9.0) the ptxas on PATH accepts."""
    exe = ptxas.ptxas_path()
    if exe is None:
        return None
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        return None
    from triton.backends.nvidia.compiler import ptx_get_version

    return ptx_get_version(f"{m.group(1)}.{m.group(2)}")


def ptx_version_for(cc: int) -> Optional[int]:
    """The PTX ISA version to emit for compute capability ``cc`` so the ptxas on PATH can assemble it: the lower of
    what it accepts and what the installed Triton would emit (None: no ptxas on PATH, leave Triton's default)."""
    system = _system_ptx_version()
    if system is None:
        return None
    try:
        from triton.backends.nvidia.compiler import get_ptx_version_from_options

        bundled = get_ptx_version_from_options(types.SimpleNamespace(ptx_version=None), cc)
        return min(system, bundled)
    except Exception:  # no bundled ptxas: the system one decides
        return system


def _config_str(spec: common.AotSpec) -> str:
    cfg = dict(spec.config)
    cfg.setdefault("num_warps", spec.num_warps)
    cfg.setdefault("num_stages", spec.num_stages)
    return " ".join(f"{k}={v}" for k, v in cfg.items())


def _source(spec: common.AotSpec):
    from triton.compiler import ASTSource

    fn = spec.fn
    signature, attrs = {}, {}
    for idx, name in enumerate(fn.arg_names):
        if name not in spec.signature:
            raise ValueError(f"AOT spec {spec.name}: no signature entry for parameter {name!r}")
        ty = spec.signature[name]
        ty, _, hint = ty.partition(":")
        signature[name] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(idx,)] = [["tt.divisibility", 16]]
    extra = set(spec.signature) - set(fn.arg_names)
    if extra:
        raise ValueError(f"AOT spec {spec.name}: signature names unknown parameters {sorted(extra)}")
    return ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)


# -- compile -----------------------------------------------------------------------------------------
def compile_spec(spec: common.AotSpec, arch: str, emit_dir: Optional[str] = None) -> dict:
    """Compile one kernel for ``arch`` (``sm_80``, ``sm_90a``, ``sm_100a``, ...) and measure it.

    Raises :class:`mhc_kernels.ptxas.PtxasUnavailable` when no ptxas is on PATH; every
    other failure is reported in the record (``ok`` False, ``error`` set).
    """
    return _compile(arch, emit_dir, [spec])[0]


def compile_specs(specs: list, arch: str, emit_dir: Optional[str] = None) -> list[dict]:
    """:func:`compile_spec` for several specs (in an interpreted process: one child process for all)."""
    return _compile(arch, emit_dir, list(specs))


def _check(arch: str) -> None:
    if arch not in ptxas.ARCH_CC:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ptxas.ARCH_CC)}")
    if ptxas.ptxas_path() is None:
        raise ptxas.PtxasUnavailable("ptxas was not found on PATH; install the CUDA toolkit (nvcc/ptxas) to "
                                     "compile kernels without a GPU")


def _compile(arch: str, emit_dir: Optional[str], specs: list) -> list[dict]:
    _check(arch)
    from triton.runtime.jit import JITFunction

    if specs and not all(isinstance(s.fn, JITFunction) for s in specs):
        return _compile_in_child(arch, emit_dir, specs)
    return [_compile_here(s, arch, emit_dir) for s in specs]


def _compile_here(spec: common.AotSpec, arch: str, emit_dir: Optional[str]) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    cc = ptxas.ARCH_CC[arch]
    rec = {"backend": "triton", "kernel": spec.name, "arch": arch, "config": _config_str(spec),
           "registers": None, "spills": None, "smem_bytes": None, "seconds": None, "ok": False, "error": None}
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    ptx_version = ptx_version_for(cc)
    if ptx_version is not None:
        options["ptx_version"] = ptx_version
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Triton's FP-fusion default notice
            compiled = triton.compile(_source(spec), target=GPUTarget("cuda", cc, 32), options=options)
    except Exception as e:  # a compile error is a result, not a crash
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["error"] = f"{type(e).__name__}: {_brief(str(e))}"
        return rec
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    ptx = compiled.asm["ptx"]
    name = compiled.metadata.name
    try:
        found = ptxas.resources(ptx, arch)
    except ptxas.PtxasUnavailable:
        raise
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {_brief(str(e))}"
        return rec
    res = next((r for r in found if r.name == name), found[0] if found else None)
    if res is None:
        rec["error"] = "ptxas reported no entry function"
        return rec
    meta_regs = getattr(compiled, "n_regs", None)  # filled in only when a driver loads the binary
    rec["registers"] = int(meta_regs) if meta_regs else res.registers
    rec["spills"] = res.spills
    rec["smem_bytes"] = int(getattr(compiled.metadata, "shared", 0) or 0) + res.smem_bytes
    limit = ptxas.SMEM_LIMIT_BYTES[arch]
    if rec["smem_bytes"] > limit:
        rec["error"] = f"needs {rec['smem_bytes']} B of shared memory; {arch} allows {limit} B per block"
    else:
        rec["ok"] = True
    if emit_dir is not None:
        os.makedirs(emit_dir, exist_ok=True)
        stem = os.path.join(emit_dir, f"{spec.name}.{arch}")
        with open(stem + ".ptx", "w") as f:
            f.write(ptx)
        cubin = compiled.asm.get("cubin")
        if cubin:
            with open(stem + ".cubin", "wb") as f:
                f.write(cubin)
    return rec


def _brief(text: str, limit: int = 800) -> str:
    """The end of an error message (Triton's compile errors put the cause last)."""
    text = text.strip()
    return text if len(text) <= limit else "... " + text[-limit:]


def compile_all(arch: str, n: int, C: int, dtype, emit_dir: Optional[str] = None,
                skipped: Optional[list] = None) -> list[dict]:
    """Compile every Triton kernel (all modules' ``aot_specs(n, C, dtype)``) for ``arch``; one record each.

    ``dtype`` is a torch dtype or ``"bf16"``/``"fp16"``/``"fp32"``. Modules skipped because a
    sibling they import is not written yet are appended to ``skipped`` as ``(module, reason)``.
    """
    return _compile(arch, emit_dir, collect_specs(n, C, dtype, skipped))


# -- building from an interpreted process --------------------------------------------------------
def _compile_in_child(arch: str, emit_dir: Optional[str], specs: list) -> list[dict]:
    """Build ``specs`` in a child process that does not run Triton's interpreter."""
    jobs = []
    for s in specs:
        py = getattr(s.fn, "fn", s.fn)  # the Python function behind an interpreter function
        jobs.append({"module": py.__module__, "function": py.__name__, "name": s.name, "signature": s.signature,
                     "constexprs": s.constexprs, "num_warps": s.num_warps, "num_stages": s.num_stages,
                     "config": s.config})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    payload = pickle.dumps({"arch": arch, "emit_dir": emit_dir, "jobs": jobs})
    proc = subprocess.run([sys.executable, "-m", __name__], input=payload, capture_output=True, env=env)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"the AOT compile child process failed (exit {proc.returncode}): {err[-3000:]}")
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def _child_main() -> int:
    req = pickle.loads(sys.stdin.buffer.read())
    specs = []
    for j in req["jobs"]:
        fn = getattr(importlib.import_module(j["module"]), j["function"])
        specs.append(common.AotSpec(name=j["name"], fn=fn, signature=j["signature"], constexprs=j["constexprs"],
                                    num_warps=j["num_warps"], num_stages=j["num_stages"], config=j["config"]))
    records = [_compile_here(s, req["arch"], req["emit_dir"]) for s in specs]
    sys.stdout.write("\n" + json.dumps(records) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
