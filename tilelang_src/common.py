"""Shared pieces of the TileLang backend: dtypes, support rules, the kernel cache.

Every kernel is a *factory* ``build(n, C, dtype, cfg, **consts) -> T.prim_func`` over
compile-time sizes and tunables; the token count is a symbolic dim (``T.dynamic``),
so one compiled kernel serves every ``T`` (``T == 0`` never launches). Compiled
kernels are cached per (kernel, n, C, dtype, config, constants, target). Launch
wrappers take the config the core resolved (``mhc_kernels.registry.config_for``) and
never look one up.

Tile primitives and thread-level indexing. Where a tile primitive expresses a step as
readably and still runs under the CPU emulator (``emulate.py``, which compiles the
generated CUDA for host threads), the kernels use it: the reducing streaming kernels
(``pre_apply_mix_bwd``, ``post_bwd``) use ``T.Parallel`` over (token, vector) tiles,
``T.clear`` and ``T.reduce_sum``; the tensor-core projection uses ``T.gemm`` and
``T.copy``. The rest index per thread (``tx``, explicit vector loops, masks), for two
reasons that both come from checking without a GPU: the masked ragged tails (any ``C``,
any ``T``) are explicit, so the emulator exercises exactly the index arithmetic the GPU
runs; and ``T.copy`` of global tiles and the warp-level reductions lower to intrinsics
(``cp.async``, ``ldmatrix``, shuffles, TMA descriptors) that the emulator's stand-ins do
not cover (``T.gemm`` is why the ``mma`` projection variants are refused under the
emulator). Each block of a kernel carries a one-line comment with the math it computes,
and kernel signatures label their argument groups (inputs / saved for backward /
gradients in / outputs).

Vector width: streaming kernels read ``vec`` contiguous elements per access (16 bytes
at most). ``vec`` is reduced to the largest power of two dividing ``C`` so every
vector is aligned and either wholly inside or wholly outside the row; the *block*
sizes never shrink with ``C`` -- an odd ``C`` only costs scalar accesses, and the
ragged last block is masked.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from mhc_kernels.registry import dtype_and_streams_reason
from mhc_kernels.specs import ACT, next_pow2  # noqa: F401  (next_pow2: the kernel modules' one)

from . import emulation_enabled

DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
MAX_N = 8  # the n x n mixing matrices and per-stream accumulators live in registers

# Plain software pipelining, no TMA lowering (our copies are explicit and masked).
PASS_CONFIGS = {
    "tl.disable_warp_specialized": True,
    "tl.disable_tma_lower": True,
}


VECTOR_BYTES = 16   # the widest global access the kernels make (max_vec)


def alignment_reason(call) -> Optional[str]:
    """Why a tensor of ``call`` is too little aligned for the kernels' vector accesses, or None. A residual-dtype
    tensor needs the alignment of its rows (up to VECTOR_BYTES: a kernel's vectors lie inside one token's row, so
    every slice along the tokens of a fresh tensor passes); any other tensor (the float32 mixes, staged in blocks
    of tokens) needs VECTOR_BYTES."""
    kinds = {a.name: a.kind for a in call.spec.tensor_args}
    for name, align, row_align in call.alignment:
        need = min(VECTOR_BYTES, row_align) if kinds.get(name) == ACT else VECTOR_BYTES
        if align < need:
            return (f"argument '{name}' starts at an address aligned to {align} bytes only (a view at a storage "
                    f"offset); the TileLang kernels' vector accesses need it {need}-byte aligned (Triton and the "
                    f"reference serve it; so does a copy: .clone())")
    return None


def supports_call(call) -> Optional[str]:
    """None when the TileLang kernels can serve ``call`` (a validated Call), else why not."""
    if call.device.type != "cuda" and not (call.device.type == "cpu" and emulation_enabled()):
        return f"TileLang kernels run on CUDA devices only; got {call.device.type}"
    return alignment_reason(call) or dtype_and_streams_reason(call, "TileLang kernels", tuple(DTYPES), MAX_N,
                                                              "per-stream values are kept in registers")


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPES[dtype]


def elem_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def max_vec(dtype: torch.dtype, C: int, bytes_per_access: int = VECTOR_BYTES) -> int:
    """Largest power-of-two element count <= ``bytes_per_access`` bytes that divides ``C``."""
    v = max(1, bytes_per_access // elem_bytes(dtype))
    while v > 1 and C % v:
        v //= 2
    return v


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Shape:
    """What a config depends on: token count, streams, hidden width, residual dtype."""

    T: int
    n: int
    C: int
    dtype: torch.dtype


def shape_of(call) -> Shape:
    return Shape(int(call.T), int(call.n or 1), int(call.C or 1), call.dtype)


SMS_OVERRIDE: Optional[int] = None  # the SM count configs are planned for (runtime_keys.recording), else the GPU's


def num_sms(device=None) -> int:
    if SMS_OVERRIDE is not None:
        return SMS_OVERRIDE
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(device or torch.cuda.current_device()).multi_processor_count
    return 132  # H100 SXM: the planning default when no GPU is present (AOT)


def _freeze(d: dict) -> tuple:
    return tuple(sorted(d.items()))


EMULATED = "emulated"  # the "target" of CPU tensors under MHC_TILELANG_EMULATE=1 (emulate.py)


def runtime_target(device: torch.device):
    if device.type == "cpu":
        return EMULATED
    major, minor = torch.cuda.get_device_capability(device)
    arch = f"sm_{major}{minor}" + ("a" if major in (9, 10) else "")
    return {"kind": "cuda", "arch": arch}


@functools.lru_cache(maxsize=None)
def _compiled(kdef_name: str, n: int, C: int, dtype: torch.dtype, cfg: tuple, consts: tuple, target: str):
    import tilelang

    kdef = KERNELS[kdef_name]
    prim = kdef.build(n, C, dtype, dict(cfg), **dict(consts))
    if target == repr(EMULATED):
        from .emulate import EmulatedKernel

        return EmulatedKernel(prim)
    return tilelang.compile(prim, target=eval(target), pass_configs=dict(PASS_CONFIGS))  # noqa: S307 (our own repr)


def get_kernel(name: str, n: int, C: int, dtype: torch.dtype, cfg: dict, device: torch.device, **consts):
    """The compiled kernel ``name`` for these sizes/config on ``device``'s arch (cached)."""
    return _compiled(name, n, C, dtype, _freeze(KERNELS[name].cfg_of(cfg)), _freeze(consts),
                     repr(runtime_target(device)))


@dataclass
class KernelDef:
    """One TileLang kernel factory, as the AOT compiler and the tests see it."""

    name: str                                    # e.g. "post_fwd"
    op: str                                      # the op whose config it takes, e.g. "post"
    build: Callable[..., Any]                    # (n, C, dtype, cfg, **consts) -> prim_func
    keys: tuple[str, ...]                        # the config keys this kernel uses
    consts: Callable[[Shape], dict] = lambda s: {}  # compile-time constants at an AOT shape
    act_dependent: bool = True                   # False: depends on n only (mix kernels)
    aot_T: int = 0                               # token count its AOT config is chosen for (0: default)
    aot_config: Optional[Callable[[Shape], dict]] = None  # its default config when op's is not flat (the tail)

    def cfg_of(self, cfg: dict) -> dict:
        return {k: cfg[k] for k in self.keys}


KERNELS: dict[str, KernelDef] = {}


def kernel_def(kdef: KernelDef) -> KernelDef:
    KERNELS[kdef.name] = kdef
    return kdef
