"""Shared pieces of the Triton backend: what every kernel supports, AOT specs.

Every Triton kernel module exposes, for each op it implements:

* a launch wrapper with the same signature and outputs as the matching function of
  :mod:`mhc_kernels.reference.torch_ref` plus a keyword-only ``config: dict``, which the
  core resolves once per call (``mhc_kernels.registry.config_for``: the tuned entry, else
  the default) -- a wrapper never looks a config up itself;
* ``config_space(op, call) -> list[dict]`` and ``default_config(op, call) -> dict`` for its ops;
* ``aot_specs(n, C, dtype) -> list[AotSpec]``: the kernels at their default configs
  for a representative shape, which ``mhc-kernels compile`` builds for real GPU
  targets without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from mhc_kernels.registry import dtype_and_streams_reason
from mhc_kernels.specs import next_pow2  # noqa: F401  (the kernel modules' one next_pow2)

from . import interpreter_enabled

if interpreter_enabled():   # every kernel module imports this one: the interpreter fix is in before any launch
    from .compat import patch_interpreter

    patch_interpreter()

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_N = 8  # n*n mixing matrices live in registers; n=16 would need 256 per token


def supports_call(call) -> Optional[str]:
    """None when a Triton kernel can serve ``call`` (a validated Call), else why not."""
    return dtype_and_streams_reason(call, "Triton kernels", DTYPES, MAX_N, "the n x n mixing matrix is kept in "
                                    "registers")


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
