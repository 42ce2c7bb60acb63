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

import contextlib
import dataclasses
import hashlib
import os
import re
import sys
import tempfile
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


# TileLang's barrier planner (the ThreadSync pass) prints this, through its C++ logging, when it needs a barrier
# inside a branch whose condition differs between threads: it moves the barrier out of the branch, where it no
# longer separates the two accesses -- a possible shared-memory race the generated code keeps.
_SYNC_WARNING = re.compile(r"Warning: \[ThreadSync\] ([^\n]*)")


@contextlib.contextmanager
def sync_warnings(sink: list):
    """Collect into ``sink`` the ThreadSync warnings TileLang's passes print while the block runs (they go to file
    descriptor 2, past Python's ``sys.stderr``). The rest of what was printed is written back to stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
            sink.extend(m.group(1).strip() for m in _SYNC_WARNING.finditer(text))
            rest = "".join(line for line in text.splitlines(keepends=True) if not _SYNC_WARNING.search(line))
            if rest:
                sys.stderr.write(rest)
                sys.stderr.flush()


def _lower(prim, arch: str):
    """tilelang's lowering and CUDA codegen for ``arch``: (generated source, dynamic shared memory bytes, the
    lowering's problems: its ThreadSync warnings and the CUDA launch limits its grid breaks at some token count)."""
    import tilelang
    from tilelang import tvm

    from .emulate import launch_limit_problems

    target = {"kind": "cuda", "arch": arch}
    with sync_warnings([]) as warned, tvm.transform.PassContext(opt_level=3, config=dict(common.PASS_CONFIGS)), \
            tvm.target.Target(target):
        art = tilelang.lower(prim, target=target)
    sizes = [int(f.attrs["dyn_shared_memory_buf"]) for f in art.device_mod.functions.values()
             if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs]
    problems = [f"TileLang could not place a barrier between two shared-memory accesses (a possible race; its "
                f"ThreadSync warning): {w}" for w in warned]
    return art.kernel_source, max(sizes, default=0), problems + launch_limit_problems(art)


def _nvcc_ptx(source: str, arch: str) -> str:
    """``nvcc -ptx`` of a generated source, with tilelang's flags and include paths (as tilelang.compile)."""
    import tilelang.contrib.nvcc as tl_nvcc
    from tilelang import tvm

    with tvm.target.Target({"kind": "cuda", "arch": arch}):
        return tl_nvcc.get_ptx_from_source(source, compile_flags=None, verbose=False)


def _lower_to_ptx(prim, arch: str):
    """The cheap path: tilelang's lowering and CUDA codegen, then ``nvcc -ptx`` (no cubin, no host
    wrapper). Same generated source as ``tilelang.compile``; used by the CPU test sweep.
    -> (source, PTX, dynamic shared memory bytes, hazards: see :func:`_lower`)."""
    src, dyn, hazards = _lower(prim, arch)
    return src, _nvcc_ptx(src, arch), dyn, hazards


_GLOBAL_NAME = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(')
_PTX_ENTRY = re.compile(r"^(?:\.visible |\.weak )?\.entry (\w+)\(.*?^\}$", re.M | re.S)


def _split_preamble(source: str) -> tuple[str, str]:
    """(the leading preprocessor block, the rest) of a generated source."""
    lines = source.splitlines()
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
        i += 1
    return "\n".join(lines[:i]), "\n".join(lines[i:])


def _ptx_batch(sources: list[str], arch: str) -> list[tuple[str, list]]:
    """PTX entries and ``ptxas`` resources of several generated sources, from one ``nvcc -ptx`` and one ``ptxas``
    per distinct preamble (the include block, which differs by dtype and by tensor-core use).

    nvcc spends about 1.5 s parsing tilelang's headers and a few milliseconds per kernel, so a sweep of ~200
    kernels is many times cheaper in batches. Each source's kernels are renamed apart (``<name>__b<i>``) and its
    body appended after the preamble; ptxas reports per function, so registers, spills and shared memory are
    each kernel's own. Returns, per source, (its ``.entry`` functions' PTX, its resources under the original
    names). A batch that nvcc or ptxas refuses raises: the caller then builds its kernels one by one, so an
    error is attributed to its kernel.
    """
    groups: dict[str, list] = {}
    for i, src in enumerate(sources):
        pre, body = _split_preamble(src)
        names = sorted(set(_GLOBAL_NAME.findall(body)))
        if not names:
            raise ValueError("no kernel definition found in a generated source")
        mapping = {f"{nm}__b{i}": nm for nm in names}
        for new, nm in mapping.items():
            body = re.sub(rf"\b{nm}\b", new, body)
        groups.setdefault(pre, []).append((i, body, mapping))
    out: list = [None] * len(sources)
    for pre, members in groups.items():
        ptx = _nvcc_ptx("\n".join([pre, *(body for _, body, _ in members)]), arch)
        entries = {m.group(1): m.group(0) for m in _PTX_ENTRY.finditer(ptx)}
        res = {r.name: r for r in ptxas.resources(ptx, arch)}
        for i, _, mapping in members:
            missing = [new for new in mapping if new not in entries or new not in res]
            if missing:
                raise ValueError(f"kernels {missing} are missing from the batch's PTX or ptxas report")
            out[i] = ("\n".join(entries[new] for new in mapping),
                      [dataclasses.replace(res[new], name=nm) for new, nm in mapping.items()])
    return out


def _record(name: str, arch: str) -> dict:
    return {"backend": "tilelang", "kernel": name, "arch": arch, "config": "", "registers": None, "spills": None,
            "smem_bytes": None, "hazards": [], "seconds": 0.0, "ok": False, "error": None, "source": None,
            "ptx": None}


def _prepare(name: str, arch: str, n: int, C: int, dtype: torch.dtype, config, consts, T):
    """(an empty record of the kernel's build, its prim_func) at the given or the AOT config and constants."""
    _load_all()
    kdef = common.KERNELS[name]
    rec = _record(name, arch)
    cfg = kdef.cfg_of(config) if config is not None else _config_for(kdef, n, C, dtype, T)
    if consts is None:
        consts = kdef.consts(common.Shape(T or AOT_T, n, C, dtype))
    rec["config"] = ", ".join(f"{k}={v}" for k, v in cfg.items()) + "".join(f", {k}={v}" for k, v in consts.items())
    return rec, kdef.build(n, C, dtype, cfg, **consts)


def _finish(rec: dict, src: str, ptx: str, res: list, dyn: int, hazards: list, n: int, C: int, dtype: torch.dtype,
            emit_dir: Optional[str]) -> None:
    """Fill ``rec`` from the build's source, PTX, ptxas resources and the lowering's hazards (:func:`_lower`); ``ok``
    unless it spills, overflows smem or has a hazard."""
    rec.update(source=src, ptx=ptx,
               registers=max((r.registers for r in res), default=0),
               spills=sum(r.spills for r in res),
               smem_bytes=max((r.smem_bytes for r in res), default=0) + dyn,
               hazards=list(hazards))
    limit = ptxas.SMEM_LIMIT_BYTES.get(rec["arch"])
    problems = []
    if rec["spills"]:
        problems.append(f"{rec['spills']} bytes of register spills")
    if limit is not None and rec["smem_bytes"] > limit:
        problems.append(f"{rec['smem_bytes']} bytes of shared memory > {limit}")
    problems += hazards
    rec["ok"] = not problems
    rec["error"] = "; ".join(problems) or None
    if emit_dir:
        os.makedirs(emit_dir, exist_ok=True)
        tag = hashlib.sha1(rec["config"].encode()).hexdigest()[:8]  # one kernel name, several keys
        stem = os.path.join(emit_dir, f"{rec['kernel']}.n{n}.C{C}.{common.dtype_name(dtype)}.{tag}.{rec['arch']}")
        with open(stem + ".cu", "w") as f:
            f.write(src)
        with open(stem + ".ptx", "w") as f:
            f.write(ptx)


def _failed(rec: dict, e: Exception) -> None:
    rec["error"] = f"{type(e).__name__}: {str(e).strip()[-1500:]}"


def compile_one(name: str, arch: str, n: int, C: int, dtype: torch.dtype, *, config: Optional[dict] = None,
                consts: Optional[dict] = None, emit_dir: Optional[str] = None, T: Optional[int] = None,
                full: bool = True) -> dict:
    """Compile kernel ``name`` for ``arch``; returns the record described in :func:`compile_all`.

    ``config`` / ``consts``: the kernel's config and compile-time constants (a recorded run-time key); by default
    its AOT config and constants at ``T`` (``AOT_T``). ``full=True`` builds with ``tilelang.compile`` (cubin and
    launcher, as at run time); ``full=False`` stops at the PTX (lowering, codegen, ``nvcc -ptx``) -- the same source,
    about half the time. The record also carries ``source`` (the CUDA) and ``ptx``.
    """
    t0 = time.perf_counter()
    rec = None
    try:
        import tilelang

        rec, prim = _prepare(name, arch, n, C, dtype, config, consts, T)
        if full:
            kernel = tilelang.compile(prim, target={"kind": "cuda", "arch": arch},
                                      pass_configs=dict(common.PASS_CONFIGS))
            hazards = _lower(prim, arch)[2]   # also when the kernel came from the disk cache, not lowered again
            src = kernel.get_kernel_source()
            ptx = kernel._get_ptx(verbose=False)
            dyn = dynamic_smem_bytes(kernel)
        else:
            src, ptx, dyn, hazards = _lower_to_ptx(prim, arch)
        _finish(rec, src, ptx, ptxas.resources(ptx, arch), dyn, hazards, n, C, dtype, emit_dir)
    except Exception as e:  # a failed kernel is a record, not an abort
        rec = rec or _record(name, arch)
        _failed(rec, e)
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def compile_many(requests: list[dict], arch: str, emit_dir: Optional[str] = None) -> list[dict]:
    """:func:`compile_one` with ``full=False`` for each request (``name``, ``n``, ``C``, ``dtype`` and optionally
    ``config``, ``consts``, ``T``): each kernel lowered on its own, then one ``nvcc -ptx`` and one ``ptxas`` per
    distinct include preamble (:func:`_ptx_batch`). Each record's ``ptx`` is its own ``.entry`` functions and
    ``seconds`` its share of the batch. A kernel that fails to lower, or a batch nvcc refuses, is built one by
    one, so every error is its own."""
    def one_by_one(q):
        return compile_one(q["name"], arch, q["n"], q["C"], q["dtype"], config=q.get("config"),
                           consts=q.get("consts"), T=q.get("T"), emit_dir=emit_dir, full=False)

    t0 = time.perf_counter()
    recs, lowered = [], []
    for q in requests:
        try:
            rec, prim = _prepare(q["name"], arch, q["n"], q["C"], q["dtype"], q.get("config"), q.get("consts"),
                                 q.get("T"))
            src, dyn, hazards = _lower(prim, arch)
            lowered.append((len(recs), q, src, dyn, hazards))
        except Exception:
            rec = one_by_one(q)
        recs.append(rec)
    try:
        built = _ptx_batch([src for _, _, src, _, _ in lowered], arch) if lowered else []
    except Exception:
        built = None
    for j, (i, q, src, dyn, hazards) in enumerate(lowered):
        if built is None:
            recs[i] = one_by_one(q)
            continue
        ptx, res = built[j]
        try:
            _finish(recs[i], src, ptx, res, dyn, hazards, q["n"], q["C"], q["dtype"], emit_dir)
        except Exception as e:
            _failed(recs[i], e)
    share = round((time.perf_counter() - t0) / max(1, len(requests)), 3)
    for r in recs:
        r["seconds"] = r["seconds"] or share
    return recs


def compile_all(arch: str, n: int, C: int, dtype: torch.dtype, emit_dir: str | None = None,
                tokens: tuple = (AOT_T,), sms: Optional[int] = None) -> list[dict]:
    """Compile every TileLang kernel the run time launches for ``(T, n, C, dtype)`` at each ``T`` of ``tokens`` --
    every op forward and backward, every optional-weight variant, planned for ``sms`` SMs (default: the arch's
    usual count, :data:`.runtime_keys.ARCH_SMS`) -- on ``arch``. Each distinct key is built once.

    Returns one record per key: ``{"backend": "tilelang", "kernel", "arch", "config" (str: config and constants),
    "registers", "spills", "smem_bytes", "hazards", "seconds", "ok", "error"}``. ``ok`` is False when
    compilation failed, the kernel spills registers, its shared memory exceeds the arch's limit, or it has a
    hazard the CPU emulator cannot show (``hazards``: a shared-memory conflict TileLang's barrier planner could
    not fence, a grid past CUDA's launch limits at some token count; ``error`` says which). With ``emit_dir``
    the generated CUDA source and the PTX of each kernel are written there.
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
