"""Calls to tune with: real inputs for timing and checking, and shape-only calls for planning.

* :func:`make_call` builds valid inputs for any op (forward or backward) at a given
  shape on the target device and binds them into a canonical
  :class:`~mhc_kernels.validation.Call`. Forward inputs come from
  :func:`mhc_kernels.reference.cases.make_inputs` (the values the correctness tests
  use) for a few tokens, then are tiled along the token dim up to ``T`` on the
  device, so a 64k-token sweep never builds float64 copies on the host. A backward
  op ``<op>_bwd`` gets its forward's inputs, the reference forward's outputs
  (the saved ``mixes``/``rstd``) and random upstream gradients.
* :func:`fabricate_call` binds ``meta`` tensors of the right shapes: enough for
  ``config_space(call)`` and pruning, on any machine, at any size.
"""

from __future__ import annotations

import math

import torch

from mhc_kernels import registry
from mhc_kernels.reference import cases
from mhc_kernels.specs import ACT, COUNT, SPECS, TensorArg, dim_value
from mhc_kernels.validation import Call, bind

SEED_TOKENS = 64  # tokens generated on the host; the rest are tiled copies

# scalar arguments whose spec name differs from the case constant
_SCALAR_ALIASES = {"iters": "sinkhorn_iters", "eps": "sinkhorn_eps"}


def _mix_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shape(t: TensorArg, T: int, n: int, C: int) -> tuple:
    out = []
    for s in t.shape:
        out.append(T if s == "*" else dim_value(s, n, C))
    return tuple(out)


def _scalar(name: str, kind: str, n: int):
    if kind == COUNT:
        return n
    return cases.DEFAULT_CONSTS[_SCALAR_ALIASES.get(name, name)]


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
            args.append(_scalar(a.name, a.kind, n))
    call = bind(spec, args)
    call.device = torch.device(target)
    return call


def _tile(v, T: int, device):
    """Move ``v`` to ``device`` and tile its leading (token) dim to ``T``."""
    v = v.to(device)
    t0 = v.shape[0]
    if t0 != T:
        reps = math.ceil(T / t0)
        v = v.repeat((reps,) + (1,) * (v.dim() - 1))[:T].contiguous()
    return v


def _forward_inputs(op: str, T: int, n: int, C: int, dtype, device, seed: int) -> dict:
    spec = SPECS[op]
    seed_T = max(1, min(T, SEED_TOKENS))
    d = cases.make_inputs(op, (seed_T,), n, C, dtype, "cpu", seed=seed)
    out = {}
    for a in spec.args:
        v = d.get(a.name)
        if isinstance(a, TensorArg) and isinstance(v, torch.Tensor):
            v = _tile(v, T, device) if a.shape and a.shape[0] == "*" else v.to(device)
        out[a.name] = v
    return out


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def make_call(op: str, T: int, n: int, C: int, dtype: torch.dtype, device, *, seed: int = 0) -> Call:
    """A bound call of ``op`` with valid inputs of ``T`` tokens on ``device`` (see the module docstring)."""
    spec = SPECS[op]
    device = torch.device(device)
    if op in cases.CASES:
        d = _forward_inputs(op, T, n, C, dtype, device, seed)
        return bind(spec, [d.get(a.name) for a in spec.args])
    if not op.endswith("_bwd") or op[:-4] not in cases.CASES:
        raise ValueError(f"no input recipe for op {op!r}")
    fwd = op[:-4]
    fspec = SPECS[fwd]
    d = _forward_inputs(fwd, T, n, C, dtype, device, seed)
    fcall = bind(fspec, [d.get(a.name) for a in fspec.args])
    ref = registry.get_kernel(fwd, "reference")
    with torch.no_grad():
        outs = _as_tuple(ref.fn(*fcall.args))
    named = dict(zip((a.name for a in fspec.args), fcall.args))
    named.update(zip((o.name for o in fspec.outputs), outs))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    args = []
    for a in spec.args:
        if a.name in named:
            args.append(named[a.name])
        elif isinstance(a, TensorArg) and (a.name == "grad" or a.name.startswith("grad_")):
            if a.optional:
                args.append(None)
                continue
            dt = dtype if a.kind == ACT else _mix_dtype(dtype)
            args.append(torch.randn(_shape(a, T, n, C), generator=gen, device=device, dtype=torch.float32).to(dt))
        elif isinstance(a, TensorArg):
            if not a.optional:
                raise ValueError(f"{op}: no value for required argument {a.name!r}")
            args.append(None)
        else:
            args.append(_scalar(a.name, a.kind, n))
    return bind(spec, args)
