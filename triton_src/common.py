"""Shared pieces of the Triton backend: what every kernel supports, config lookup, AOT specs.

Every Triton kernel module exposes, for each op it implements:

* a launch wrapper with the same signature and outputs as the matching function of
  :mod:`mhc_kernels.reference.torch_ref` plus a keyword-only ``config: dict | None``
  (``None``: the tuned config if one is stored, else the default heuristic);
* ``config_space(op, call) -> list[dict]`` and ``default_config(op, call) -> dict`` for its ops;
* ``aot_specs(n, C, dtype) -> list[AotSpec]``: the kernels at their default configs
  for a representative shape, which ``mhc-kernels compile`` builds for real GPU
  targets without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mhc_kernels import tuned

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_N = 8  # n*n mixing matrices live in registers; n=16 would need 256 per token


def supports_call(call) -> Optional[str]:
    """None when a Triton kernel can serve ``call`` (a validated Call), else why not."""
    if call.dtype not in DTYPES:
        return (f"Triton kernels take bf16/fp16/fp32 residuals (float32 mixes); got {call.dtype} "
                f"-- the reference backend serves float64")
    if call.n is not None and call.n > MAX_N:
        return (f"Triton kernels support n <= {MAX_N} streams (the n x n mixing matrix is kept in registers); "
                f"got n={call.n} -- the reference backend serves it")
    return None


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def resolve_config(op: str, residual_like: torch.Tensor, n: int, C: int, T: int, config, default) -> dict:
    """``config`` if given, else a tuned config from the store (CUDA only), else ``default()``."""
    if config is not None:
        return config
    if residual_like.is_cuda:
        hit = tuned.lookup(op, "triton", residual_like.device, residual_like.dtype, n, C, T)
        if hit is not None:
            return hit
    return default()


@dataclass
class AotSpec:
    """One kernel instance to compile ahead of time (``triton.compile(ASTSource(...))``)."""

    name: str                      # e.g. "norm_fn_fwd"
    fn: Any                        # the @triton.jit function
    signature: dict[str, str]      # every parameter -> "*bf16", "*fp32", "i32", "fp32" or "constexpr"
    constexprs: dict[str, Any]     # values of the constexpr parameters
    num_warps: int = 4
    num_stages: int = 2
    config: dict = field(default_factory=dict)  # the tunables, as shown in reports
