"""Ahead-of-time compilation of every TileLang kernel for a GPU that need not be present.

:func:`compile_all` builds exactly the kernels the run time launches for the shapes it is given --
the keys (configs, constants, split counts) recorded by replaying every op forward and backward on
CPU with stub kernels (:mod:`.runtime_keys`) -- with ``tilelang.compile`` for a real CUDA arch
(nvcc does the work, no GPU needed; TileLang's disk cache keeps each build), then assembles
the kernel's PTX (nvcc -ptx on the generated CUDA source, which is what tilelang 0.1.15's
``JITKernel._get_ptx`` does) with ``ptxas -v`` to read registers, spills and static shared
memory (:mod:`mhc_kernels.ptxas`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import Optional

import torch

from mhc_kernels import ptxas

from . import common

AOT_T = 4096  # token count the default configs are chosen for (the kernels themselves take any T)


def _load_all():
    from . import fused, mixes, norm, streaming  # noqa: F401  (fill common.KERNELS)


def kernel_names() -> list[str]:
    _load_all()
    return list(common.KERNELS)


def _config_for(kdef: common.KernelDef, n: int, C: int, dtype: torch.dtype, T: Optional[int] = None) -> dict:
    from . import backend

    s = common.Shape(T if T is not None else kdef.aot_T or AOT_T, n, C, dtype)
    return kdef.cfg_of(kdef.aot_config(s) if kdef.aot_config is not None else backend.OPS[kdef.op].default(s))


def dynamic_smem_bytes(kernel) -> int:
    """Dynamic shared memory the kernel launches with (``ptxas -v`` reports static shared memory only).

    Read from the device module's ``dyn_shared_memory_buf`` attribute when tilelang kept it,
    else from the generated host launcher (a kernel loaded from tilelang's disk cache has no
    device module): the launch's last packed argument is the dynamic shared memory size.
    """
    mod = getattr(kernel.adapter, "device_mod", None)
    if mod is not None:
        sizes = [int(f.attrs["dyn_shared_memory_buf"]) for f in mod.functions.values()
                 if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs]
        return max(sizes, default=0)
    if "extern __shared__" not in kernel.get_kernel_source():
        return 0
    host = kernel.get_host_source()
    best = 0
    for call in re.finditer(r"TVMFFIFunctionCall\(\w+_kernel_packed, \(TVMFFIAny\*\) stack_ffi_any, (\d+)", host):
        last = int(call.group(1)) - 1
        sets = re.findall(rf"stack_ffi_any\)\[{last}\]\.v_int64\) = \(\(int64_t\)(\d+)\)", host[:call.start()])
        if sets:
            best = max(best, int(sets[-1]))
    return best


def _lower_to_ptx(prim, arch: str):
    """The cheap path: tilelang's lowering and CUDA codegen, then ``nvcc -ptx`` (no cubin, no host
    wrapper). Same generated source as ``tilelang.compile``; used by the CPU test sweep."""
    import tilelang
    import tilelang.contrib.nvcc as tl_nvcc
    from tilelang import tvm

    target = {"kind": "cuda", "arch": arch}
    with tvm.transform.PassContext(opt_level=3, config=dict(common.PASS_CONFIGS)), tvm.target.Target(target):
        art = tilelang.lower(prim, target=target)
        ptx = tl_nvcc.get_ptx_from_source(art.kernel_source, compile_flags=None, verbose=False)
    sizes = [int(f.attrs["dyn_shared_memory_buf"]) for f in art.device_mod.functions.values()
             if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs]
    return art.kernel_source, ptx, max(sizes, default=0)


def compile_one(name: str, arch: str, n: int, C: int, dtype: torch.dtype, *, config: Optional[dict] = None,
                consts: Optional[dict] = None, emit_dir: Optional[str] = None, T: Optional[int] = None,
                full: bool = True) -> dict:
    """Compile kernel ``name`` for ``arch``; returns the record described in :func:`compile_all`.

    ``config`` / ``consts``: the kernel's config and compile-time constants (a recorded run-time key); by default
    its AOT config and constants at ``T`` (``AOT_T``). ``full=True`` builds with ``tilelang.compile`` (cubin and
    launcher, as at run time); ``full=False`` stops at the PTX (lowering, codegen, ``nvcc -ptx``) -- the same source,
    about half the time. The record also carries ``source`` (the CUDA) and ``ptx``.
    """
    _load_all()
    kdef = common.KERNELS[name]
    rec = {"backend": "tilelang", "kernel": name, "arch": arch, "config": "", "registers": None, "spills": None,
           "smem_bytes": None, "seconds": 0.0, "ok": False, "error": None, "source": None, "ptx": None}
    t0 = time.perf_counter()
    try:
        import tilelang

        cfg = kdef.cfg_of(config) if config is not None else _config_for(kdef, n, C, dtype, T)
        if consts is None:
            consts = kdef.consts(common.Shape(T or AOT_T, n, C, dtype))
        rec["config"] = ", ".join(f"{k}={v}" for k, v in cfg.items()) + \
            "".join(f", {k}={v}" for k, v in consts.items())
        prim = kdef.build(n, C, dtype, cfg, **consts)
        if full:
            kernel = tilelang.compile(prim, target={"kind": "cuda", "arch": arch},
                                      pass_configs=dict(common.PASS_CONFIGS))
            src = kernel.get_kernel_source()
            ptx = kernel._get_ptx(verbose=False)
            dyn = dynamic_smem_bytes(kernel)
        else:
            src, ptx, dyn = _lower_to_ptx(prim, arch)
        res = ptxas.resources(ptx, arch)
        rec.update(source=src, ptx=ptx,
                   registers=max((r.registers for r in res), default=0),
                   spills=sum(r.spills for r in res),
                   smem_bytes=max((r.smem_bytes for r in res), default=0) + dyn)
        limit = ptxas.SMEM_LIMIT_BYTES.get(arch)
        problems = []
        if rec["spills"]:
            problems.append(f"{rec['spills']} bytes of register spills")
        if limit is not None and rec["smem_bytes"] > limit:
            problems.append(f"{rec['smem_bytes']} bytes of shared memory > {limit}")
        rec["ok"] = not problems
        rec["error"] = "; ".join(problems) or None
        if emit_dir:
            os.makedirs(emit_dir, exist_ok=True)
            tag = hashlib.sha1(rec["config"].encode()).hexdigest()[:8]  # one kernel name, several keys
            stem = os.path.join(emit_dir, f"{name}.n{n}.C{C}.{common.dtype_name(dtype)}.{tag}.{arch}")
            with open(stem + ".cu", "w") as f:
                f.write(src)
            with open(stem + ".ptx", "w") as f:
                f.write(ptx)
    except Exception as e:  # a failed kernel is a record, not an abort
        rec["error"] = f"{type(e).__name__}: {str(e).strip()[-1500:]}"
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def compile_all(arch: str, n: int, C: int, dtype: torch.dtype, emit_dir: str | None = None,
                tokens: tuple = (AOT_T,), sms: Optional[int] = None) -> list[dict]:
    """Compile every TileLang kernel the run time launches for ``(T, n, C, dtype)`` at each ``T`` of ``tokens`` --
    every op forward and backward, every optional-weight variant, planned for ``sms`` SMs (default: the arch's
    usual count, :data:`.runtime_keys.ARCH_SMS`) -- on ``arch``. Each distinct key is built once.

    Returns one record per key: ``{"backend": "tilelang", "kernel", "arch", "config" (str: config and constants),
    "registers", "spills", "smem_bytes", "seconds", "ok", "error"}``. ``ok`` is False when compilation failed, the
    kernel spills registers, or its shared memory exceeds the arch's limit (``error`` says which). With
    ``emit_dir`` the generated CUDA source and the PTX of each kernel are written there.
    """
    from . import runtime_keys

    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    keys, _ = runtime_keys.record_shapes([(int(T), n, C, dtype) for T in tokens],
                                         sms or runtime_keys.ARCH_SMS.get(arch, common.num_sms()))
    out = []
    for k in keys:
        rec = compile_one(k.kernel, arch, k.n, k.C, k.torch_dtype, config=dict(k.config), consts=dict(k.consts),
                          emit_dir=emit_dir)
        rec.pop("source", None)
        rec.pop("ptx", None)
        out.append(rec)
    return out
