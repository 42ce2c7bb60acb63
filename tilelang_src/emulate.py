"""Run TileLang kernels on the CPU by compiling their *generated CUDA source* as host C++.

This is a test device, not a backend: it lets the numerics of the CUDA code TileLang
emits for our kernels be checked against the float64 oracle on a machine without a
GPU (CI). Enabled by ``MHC_TILELANG_EMULATE=1``; the TileLang backend then also serves
CPU tensors, like the Triton backend under ``TRITON_INTERPRET=1``.

How: the kernel is lowered for ``sm_90a`` exactly as for the GPU (same passes, same
generated ``kernel_source``); preprocessor lines are dropped, ``extern __shared__``
arrays become views of a per-launch buffer, and the source is compiled with ``g++``
against ``cuda_emu.h`` (threadIdx/blockIdx, ``__syncthreads``, bf16/fp16 storage types
with round-to-nearest-even conversions, the vector types, ``tl::AllReduce``). Each CUDA
thread is a user-space fiber, CTAs run one after another, each with its shared memory poisoned
(0xff bytes) at its start and its threads in ascending order in even CTAs and descending in odd
ones (so a missing barrier shows); threads that reach different numbers of barriers raise.
Grid, block and dynamic shared memory sizes are read from the host module's launch call
(:class:`Launch`) and evaluated at the actual token count; a kernel whose grid would break CUDA's
launch limits at some token count (blockIdx.y and .z stop at 65535) is refused, since this
emulator would run it and a GPU would not; so is a launch with an empty grid (TileLang's CUDA
launcher refuses it) and a tensor less aligned than the widest vector access the generated code
makes through it (a GPU would fault).

What it proves and what it does not: the index arithmetic, masking, loop bounds,
shared-memory staging, barriers and the float32 math of the generated code (rsqrtf is
``1/sqrt`` here, ``__expf``-style fast math is not used by these kernels). TileLang
itself bounds every global access by the declared buffer shape, so each tensor is
checked against those shapes here (dtype, rank, every static and symbolic dim), and is
passed inside a copy with NaN guard zones on both sides (``GUARD`` elements) as a net
under that: an out-of-bounds write there raises :class:`EmulationError`, an
out-of-bounds read feeds a NaN into the result. After the launch only the buffers the
kernel stores to (read off the lowered device code) are copied back; an input is never
written, so autograd's version counters of saved tensors stay as they were (a changed
input raises). It cannot
run inline PTX or tensor-core MMA (the ``mma`` projection variants are refused), and it
says nothing about memory-model races beyond what barriers order, timing or occupancy.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
import subprocess

import torch

from .common import VECTOR_BYTES

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu.h")
TARGET = {"kind": "cuda", "arch": "sm_90a"}


class EmulationError(RuntimeError):
    """The kernel cannot be run by the CPU emulator (or the emulator's toolchain is missing)."""


def _cache_dir() -> str:
    root = os.environ.get("MHC_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mhc_kernels")
    path = os.path.join(root, "tilelang_emu")
    os.makedirs(path, exist_ok=True)
    return path


_SIG = re.compile(r'extern "C" __global__ void __launch_bounds__\([^)]*\) (\w+)\(([^)]*)\) \{')
_SHARED = re.compile(r"extern __shared__ __align__\(\d+\) (\w+) (\w+)\[\];")


def _host_source(kernel_source: str):
    """-> (C++ source with an ``emu_entry`` function, kernel name, [(c type, name) of its params])."""
    if re.search(r"\basm\b|tl::gemm|\bmma\b|ldmatrix|tl::ptx", kernel_source):
        raise EmulationError("the kernel uses inline PTX / tensor-core MMA, which the CPU emulator cannot run")
    sig = _SIG.search(kernel_source)
    if sig is None:
        raise EmulationError("no kernel definition found in the generated source")
    name = sig.group(1)
    params = []
    for p in sig.group(2).split(","):
        p = p.replace("__restrict__", " ").strip()
        ctype, pname = p.rsplit(None, 1)
        params.append((" ".join(ctype.split()), pname))
    body = "\n".join(line for line in kernel_source.splitlines() if not line.lstrip().startswith("#"))
    body = _SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = ({m.group(1)}*)emu::smem;", body)
    call = ", ".join(f"({t})args[{i}]" if t.endswith("*") else f"*({t}*)args[{i}]"
                     for i, (t, _) in enumerate(params))
    src = (f'#include "{IMPL_HEADER}"\n{body}\n'
           f'extern "C" int emu_entry(void** args, int gx, int gy, int gz, int bx, int by, int bz, long smem) {{\n'
           f'  return emu::launch(gx, gy, gz, bx, by, bz, smem, [&] {{ {name}({call}); }});\n}}\n')
    return src, name, params


# The emulator's header with its launcher, as each kernel source includes it; precompiled once per cache (g++
# spends ~0.45 s of a kernel's 0.7 s build parsing it and the standard headers it pulls in). Should the
# precompiled header not fit (another compiler or flags), g++ ignores it and reads the text: slower, the same.
IMPL_HEADER = "emu_impl.h"
_CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fno-strict-aliasing", "-w"]


def _cxx() -> str:
    return os.environ.get("CXX", "g++")


def _header_key() -> str:
    with open(HEADER) as f:
        return hashlib.sha256((HEADER + f.read() + _cxx() + " ".join(_CXX_FLAGS)).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _impl_dir(key: str) -> str:
    """A directory holding ``emu_impl.h`` (the header with EMU_IMPLEMENTATION) and, when g++ can build it, its
    precompiled ``emu_impl.h.gch``; each file is written under a temporary name and moved in place, so
    processes building kernels side by side (pytest-xdist) never read a partial one."""
    path = os.path.join(_cache_dir(), f"impl_{key}")
    os.makedirs(path, exist_ok=True)
    impl = os.path.join(path, IMPL_HEADER)
    if not os.path.exists(impl):
        tmp = f"{impl}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(f'#define EMU_IMPLEMENTATION\n#include "{HEADER}"\n')
        os.replace(tmp, impl)
    gch = impl + ".gch"
    if not os.path.exists(gch):
        tmp = f"{gch}.{os.getpid()}.tmp"
        res = subprocess.run([_cxx(), *_CXX_FLAGS, "-x", "c++-header", impl, "-o", tmp], capture_output=True)
        if res.returncode == 0:
            os.replace(tmp, gch)
        elif os.path.exists(tmp):
            os.remove(tmp)
    return path


@functools.lru_cache(maxsize=None)
def _build_library(src: str) -> ctypes.CDLL:
    hkey = _header_key()
    key = hashlib.sha256((src + hkey).encode()).hexdigest()[:24]
    lib = os.path.join(_cache_dir(), f"k_{key}.so")
    if not os.path.exists(lib):
        cpp = lib[:-3] + ".cpp"
        with open(cpp, "w") as f:
            f.write(src)
        tmp = f"{lib}.{os.getpid()}.tmp"
        cmd = [_cxx(), *_CXX_FLAGS, "-shared", "-I", _impl_dir(hkey), cpp, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise EmulationError(f"g++ could not build the emulated kernel ({cpp}):\n{res.stderr[-3000:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(lib)
    dll.emu_entry.restype = ctypes.c_int
    dll.emu_entry.argtypes = [ctypes.POINTER(ctypes.c_void_p)] + [ctypes.c_int] * 6 + [ctypes.c_long]
    return dll


_TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                 "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8}

# CUDA's launch limits (every arch since sm_30), and the token count the grid is checked at: 2^30 is past any
# tensor a GPU holds (a bf16 (T, 128) input alone would be 256 GiB) and below where the grid's int32
# ceil-division (T + block_T - 1) / block_T wraps around
GRID_LIMITS = (2**31 - 1, 65535, 65535)
MAX_BLOCK_THREADS = 1024
MAX_TOKENS = 2**30

# Guard zones: every tensor is handed to the kernel inside a copy with GUARD elements before and after,
# filled with a NaN of a distinctive payload (bit patterns per element size). A write out of bounds (within
# the guard) changes a pattern and raises; a read out of bounds feeds a NaN into the result, which the
# comparison with the oracle then fails.
GUARD = 1024
_GUARD_BITS = {torch.float32: (torch.int32, 0x7FA5A5A5), torch.bfloat16: (torch.int16, 0x7FA5),
               torch.float16: (torch.int16, 0x7E5A), torch.int32: (torch.int32, 0x5A5A5A5A),
               torch.int64: (torch.int64, 0x5A5A5A5A5A5A5A5A), torch.uint8: (torch.uint8, 0xA5)}


def _guarded(a: torch.Tensor) -> torch.Tensor:
    """A flat copy of ``a`` with GUARD pattern elements on each side."""
    itype, bits = _GUARD_BITS[a.dtype]
    buf = torch.empty(a.numel() + 2 * GUARD, dtype=a.dtype)
    buf.view(itype).fill_(bits)
    buf[GUARD:GUARD + a.numel()] = a.reshape(-1)
    return buf


def _guard_intact(buf: torch.Tensor) -> bool:
    itype, bits = _GUARD_BITS[buf.dtype]
    raw = buf.view(itype)
    return bool((raw[:GUARD] == bits).all() and (raw[-GUARD:] == bits).all())


def _stored_buffers(device_mod, tirx) -> set:
    """Names of the buffers that a store in any device function of ``device_mod`` writes."""
    names = set()

    def visit(node):
        if isinstance(node, tirx.BufferStore):
            names.add(node.buffer.data.name)

    for _, f in device_mod.functions.items():
        if hasattr(f, "body"):
            tirx.stmt_functor.post_order_visit(f.body, visit)
    return names


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN payloads included) of two tensors of one dtype and size."""
    itype = _GUARD_BITS[a.dtype][0]
    return bool(torch.equal(a.reshape(-1).view(itype), b.reshape(-1).view(itype)))


_VECTOR_CAST = re.compile(r"\*\((u?int4|float4|u?int2|float2|u?int|float)\*\)\((\w+) ")
_VECTOR_TYPE_BYTES = {"uint4": 16, "int4": 16, "float4": 16, "uint2": 8, "int2": 8, "float2": 8, "uint": 4, "int": 4,
                      "float": 4}


def _vector_bytes(kernel_source: str, params: list) -> dict:
    """{kernel parameter: the widest vector access the generated code makes through it, in bytes} (its pointer
    must be that aligned on a GPU): read off the casts TileLang emits, ``*(uint4*)(x + ...)``."""
    out: dict = {}
    for ty, name in _VECTOR_CAST.findall(kernel_source):
        if name in params:
            out[name] = max(out.get(name, 1), _VECTOR_TYPE_BYTES[ty])
    if any(v > VECTOR_BYTES for v in out.values()):
        raise EmulationError(f"vector accesses wider than {VECTOR_BYTES} bytes in the generated code: {out}")
    return out


def _tirx_of(art):
    """The TIR module (``tvm.tirx`` or ``tvm.tir``, by TileLang version) that a lowered artifact's nodes are from."""
    f = next(iter(art.device_mod.functions.values()))
    return __import__(type(f).__module__.rsplit(".", 1)[0], fromlist=["stmt_functor"])


def eval_int(expr, sizes: dict) -> int:
    """An integer expression of the symbolic sizes (the token count ``T``), at ``sizes`` (name -> value)."""
    from tilelang import tvm

    tirx = __import__(type(expr).__module__.rsplit(".", 1)[0], fromlist=["stmt_functor"])
    found = {}
    tirx.stmt_functor.post_order_visit(expr, lambda n: found.setdefault(n, None) if isinstance(n, tirx.Var) else None)
    sub = {v: tirx.IntImm(v.dtype, sizes[v.name]) for v in found}
    return int(tvm.arith.Analyzer().simplify(tirx.stmt_functor.substitute(expr, sub)).value)


class Launch:
    """How the host module of a lowered TileLang artifact launches its kernel: the kernel's name, the arguments
    of the launch call and its launch parameters (grid and block extents, dynamic shared memory) as expressions
    of the symbolic sizes."""

    def __init__(self, art, name: str, n_params: int):
        tirx = _tirx_of(art)
        calls = []

        def visit(node):
            if (isinstance(node, tirx.Call) and node.args and isinstance(node.args[0], tirx.StringImm)
                    and node.args[0].value == name):
                calls.append(node)

        for _, f in art.host_mod.functions.items():
            if hasattr(f, "body"):
                tirx.stmt_functor.post_order_visit(f.body, visit)
        if len(calls) != 1:
            raise EmulationError(f"expected one launch of {name} in the host module, found {len(calls)}")
        args = list(calls[0].args[1:])
        self.name = name
        self.call_args = args[:n_params]
        gfun = [f for _, f in art.device_mod.functions.items()][0]
        key = [k for k in gfun.attrs.keys() if str(k).endswith("kernel_launch_params")]
        # (blockIdx.x, blockIdx.y, threadIdx.x, threadIdx.y, threadIdx.z[, *.use_dyn_shared_memory])
        self.names = [str(v) for v in gfun.attrs[key[0]]] if key else []
        self.exprs = args[n_params:]
        if not key or len(self.exprs) != len(self.names):
            raise EmulationError(f"{name}: launch parameters {self.exprs} do not match {self.names}")

    def dims(self, sizes: dict):
        """((grid x, y, z), (block x, y, z), dynamic shared memory bytes) at ``sizes``."""
        dims = {k: eval_int(e, sizes) for k, e in zip(self.names, self.exprs)}
        grid = [dims.get(f"blockIdx.{a}", 1) for a in "xyz"]
        block = [dims.get(f"threadIdx.{a}", 1) for a in "xyz"]
        smem = sum(v for k, v in dims.items() if k.endswith("use_dyn_shared_memory"))
        return grid, block, smem

    def limit_problems(self) -> list:
        """What of CUDA's launch limits the launch breaks at some token count: the emulator runs any grid, a GPU
        refuses one past them (``invalid configuration argument``). The grid is evaluated at :data:`MAX_TOKENS`,
        past any token count a GPU holds; a kernel with its token blocks on ``blockIdx.y`` fails this (a GPU
        from ``T > 65535 * block_T`` on): token blocks belong on ``blockIdx.x``."""
        (gx, gy, gz), block, _ = self.dims({"T": MAX_TOKENS})
        if min(gx, gy, gz, *block) < 1:
            return [f"the launch evaluates to grid {(gx, gy, gz)}, block {tuple(block)} at T={MAX_TOKENS}: "
                    f"its limits cannot be checked"]
        over = [f"blockIdx.{a} extent {g} > {lim}" for a, g, lim in zip("xyz", (gx, gy, gz), GRID_LIMITS) if g > lim]
        threads = block[0] * block[1] * block[2]
        if threads > MAX_BLOCK_THREADS:
            over.append(f"{threads} threads per CTA > {MAX_BLOCK_THREADS}")
        return [f"at T={MAX_TOKENS} tokens the launch exceeds CUDA's limits ({'; '.join(over)}): a GPU would "
                f"refuse it"] if over else []


def launch_limit_problems(art) -> list:
    """:meth:`Launch.limit_problems` of a lowered artifact's kernel (the AOT records' check)."""
    name = _SIG.search(art.kernel_source)
    if name is None:
        return ["no kernel definition found in the generated source"]
    n_params = len(name.group(2).split(","))
    return Launch(art, name.group(1), n_params).limit_problems()


class EmulatedKernel:
    """Callable like a compiled TileLang kernel: positional tensors and scalars in the prim_func's order."""

    def __init__(self, prim):
        import tilelang
        from tilelang import tvm

        from .common import PASS_CONFIGS

        with tvm.transform.PassContext(opt_level=3, config=dict(PASS_CONFIGS)), tvm.target.Target(TARGET):
            art = tilelang.lower(prim, target=TARGET)
        self.source, self.name, self.params = _host_source(art.kernel_source)
        self._launch = Launch(art, self.name, len(self.params))
        self.call_args = self._launch.call_args
        problems = self._launch.limit_problems()
        if problems:
            raise EmulationError(f"{self.name}: {problems[0]}")
        self.lib = _build_library(self.source)
        self.vector_bytes = _vector_bytes(art.kernel_source, [p for _, p in self.params])
        tirx = _tirx_of(art)
        self._tirx = tirx
        self.arg_names = []   # prim_func parameter -> name in the kernel signature
        self.buffers = {}     # name -> (dtype, shape exprs)
        for p in prim.params:
            buf = prim.buffer_map.get(p)
            if buf is not None:
                self.arg_names.append(buf.data.name)
                self.buffers[buf.data.name] = (str(buf.dtype), list(buf.shape))
            else:
                self.arg_names.append(p.name)
        if len(set(self.arg_names)) != len(self.arg_names):
            # arguments are bound to the kernel signature by name: two alike would bind silently wrong
            raise EmulationError(f"{self.name}: parameter names are not unique ({self.arg_names})")
        # the buffers the kernel may write: only these are copied back after a launch (an input's storage,
        # and so its autograd version counter, is never touched)
        self.written = _stored_buffers(art.device_mod, tirx) & set(self.buffers)

    def __call__(self, *args):
        if len(args) != len(self.arg_names):
            raise TypeError(f"{self.name}: expected {len(self.arg_names)} arguments, got {len(args)}")
        values, sizes, keep, derived, guarded = {}, {}, [], [], []
        for name, a in zip(self.arg_names, args):
            if name in self.buffers:
                dtype, shape = self.buffers[name]
                if not isinstance(a, torch.Tensor) or a.device.type != "cpu" or not a.is_contiguous():
                    raise EmulationError(f"{self.name}: argument {name!r} must be a contiguous CPU tensor")
                need = self.vector_bytes.get(name, 1)
                if a.numel() and a.data_ptr() % need:
                    # the kernel runs on a guarded copy here, which is aligned; a GPU would fault
                    raise EmulationError(f"{self.name}: argument {name!r} is not {need}-byte aligned (address "
                                         f"{a.data_ptr():#x}) but the kernel accesses it in {need}-byte vectors: "
                                         f"a GPU would fault")
                if a.dtype != _TORCH_DTYPES[dtype] or a.dim() != len(shape):
                    raise EmulationError(f"{self.name}: argument {name!r} must be {dtype} with {len(shape)} dims, "
                                         f"got {a.dtype} with {a.dim()}")
                for d, (want, got) in enumerate(zip(shape, a.shape)):
                    if isinstance(want, self._tirx.Var):
                        if sizes.setdefault(want.name, int(got)) != int(got):
                            raise EmulationError(f"{self.name}: {name!r} dim {d} is {got}, expected {sizes[want.name]}")
                    else:
                        derived.append((name, d, want, int(got)))  # checked once the symbolic sizes are known
                buf = _guarded(a)
                guarded.append((name, a, buf))
                values[name] = ctypes.c_void_p(buf[GUARD:].data_ptr())
            else:
                values[name] = a
        for name, d, want, got in derived:
            if eval_int(want, sizes) != got:
                raise EmulationError(f"{self.name}: {name!r} dim {d} is {got}, expected {eval_int(want, sizes)}")
        ptrs = []
        for (ctype, pname), expr in zip(self.params, self.call_args):
            key = expr.name if isinstance(expr, self._tirx.Var) else pname
            if ctype.endswith("*"):
                ptrs.append(values[key].value)
                continue
            v = sizes[key] if key in sizes else values[key]
            box = (ctypes.c_int if ctype in ("int", "int32_t") else
                   ctypes.c_long if ctype == "int64_t" else ctypes.c_float)(v)
            keep.append(box)
            ptrs.append(ctypes.addressof(box))
        (gx, gy, gz), (bx, by, bz), smem = self._launch.dims(sizes)
        if min(gx, gy, gz) < 1:
            # TileLang's CUDA launcher refuses this ("grid dimension must be positive"): the wrapper must not launch
            raise EmulationError(f"{self.name}: launched with the empty grid {(gx, gy, gz)} at {sizes}; a GPU "
                                 f"launch refuses it, so an empty input must return before the launch")
        arr = (ctypes.c_void_p * len(ptrs))(*ptrs)
        status = self.lib.emu_entry(arr, gx, gy, gz, bx, by, bz, smem)
        if status == 1:
            raise EmulationError(f"{self.name}: the threads of a CTA reached different numbers of __syncthreads() "
                                 f"(some returned while others waited at a barrier): a deadlock or a race on the GPU")
        if status != 0:
            raise EmulationError(f"{self.name}: the emulator could not map the fiber stacks for {bx * by * bz} threads")
        for name, a, buf in guarded:
            if not _guard_intact(buf):
                raise EmulationError(f"{self.name}: out-of-bounds write around argument {name!r} "
                                     f"(shape {tuple(a.shape)}): the guard zone was overwritten")
            inner = buf[GUARD:GUARD + a.numel()]
            if name in self.written:
                a.view(-1).copy_(inner)
            elif not _same_bits(inner, a):
                raise EmulationError(f"{self.name}: argument {name!r} changed although the kernel has no store "
                                     f"to it (the emulator copies back only the buffers a kernel writes)")
