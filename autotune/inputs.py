"""Calls to tune with: real inputs for timing and checking, and shape-only calls for planning.

* :func:`make_call` builds valid inputs for any op (forward or backward) at a given
  shape on the target device with the project's one input recipe
  (:func:`mhc_kernels.reference.cases.op_inputs`: the values the correctness tests use,
  for a few tokens, tiled along the token dim up to ``T`` on the device, so a 64k-token
  sweep never builds float64 copies on the host) and binds them into a canonical
  :class:`~mhc_kernels.validation.Call`.
* :func:`fabricate_call` binds ``meta`` tensors of the right shapes: enough for
  ``config_space(call)`` and pruning, on any machine, at any size.
"""

from __future__ import annotations

import torch

from mhc_kernels.reference import cases
from mhc_kernels.specs import ACT, COUNT, GROUP, SPECS, TensorArg, default_sizes, dim_value
from mhc_kernels.validation import Call, bind

SEED_TOKENS = 64  # tokens generated on the host; the rest are tiled copies


def _mix_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: TensorArg, T: int, n: int, C: int) -> tuple:
    sizes = default_sizes(n, C)
    return tuple(T if s == "*" else dim_value(s, n, C, sizes) for s in t.shape)


def _scalar(spec, name: str, kind: str, n: int, C: int):
    if kind == COUNT:
        return n
    if kind == GROUP:   # the FP8 group that divides C (128 where it does)
        return 128 if C % 128 == 0 else 32
    return spec.defaults[name]


def fabricate_call(op: str, T: int, n: int, C: int, dtype: torch.dtype, target="cuda") -> Call:
    """A bound call of ``op`` whose tensors are empty ``meta`` tensors of the right shapes and dtypes.

    ``dtype`` is the residual dtype (for ops without a residual, the mixes are float32).
    Optional tensor arguments are left out (``None``). The call's ``device`` reads
    ``target`` (the device the plan is for), so ``supports(call)`` and
    ``config_space(call)`` answer as they would there; its tensors hold no data.
    """
    device = "meta"
    spec = SPECS[op]
    args = []
    for a in spec.args:
        if isinstance(a, TensorArg):
            if a.optional:
                args.append(None)
                continue
            dt = dtype if a.kind == ACT else _mix_dtype(dtype)
            args.append(torch.empty(_shape(a, T, n, C), dtype=dt, device=device))
        else:
            args.append(_scalar(spec, a.name, a.kind, n, C))
    call = bind(spec, args)
    call.device = torch.device(target)
    return call


def make_call(op: str, T: int, n: int, C: int, dtype: torch.dtype, device, *, seed: int = 0) -> Call:
    """A bound call of ``op`` with valid inputs of ``T`` tokens on ``device`` (see the module docstring)."""
    return bind(SPECS[op], cases.op_args(op, (T,), n, C, dtype, torch.device(device), seed=seed, tile=SEED_TOKENS))
