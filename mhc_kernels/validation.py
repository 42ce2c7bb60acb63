"""Input validation at the public boundary, driven by the op specs.

:func:`bind` checks one call's arguments against its :class:`~mhc_kernels.specs.OpSpec`
(types, dtypes, devices, shapes, scalar ranges), binds the symbols ``n``, ``C`` and
the leading dims from the spec's primary tensor, and returns a :class:`Call` whose
tensors are flattened to ``(T, ...)`` and contiguous. Backends only ever see such
canonical tensors. Errors name the operator, the argument, what was expected and
what was given.

The same function runs on fake tensors (shape-only, possibly symbolic), so tracing
under ``torch.compile`` reports the same errors as eager execution.
"""

from __future__ import annotations

import math

import torch

from .errors import MHCDtypeError, MHCInputError
from .specs import ACT, ACT_DTYPES, COUNT, EPS, ITERS, MIX, REAL, OpSpec, TensorArg, dim_value, format_template

_ACT_NAMES = "bfloat16, float16 or float32"


class Call:
    """One validated call: canonical (flattened, contiguous) arguments plus the bound sizes."""

    __slots__ = ("spec", "args", "T", "n", "C", "lead", "act_dtype", "mix_dtype", "device")

    def __init__(self, spec, args, T, n, C, lead, act_dtype, mix_dtype, device):
        self.spec = spec
        self.args = args
        self.T = T
        self.n = n
        self.C = C
        self.lead = lead
        self.act_dtype = act_dtype
        self.mix_dtype = mix_dtype
        self.device = device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype that selects kernels: the residual's, or the mixes' for ops without one."""
        return self.act_dtype if self.act_dtype is not None else self.mix_dtype

    def output_shapes(self):
        """Shapes (with the original leading dims) and dtypes of the spec's outputs."""
        out = []
        for t in self.spec.outputs:
            shape = []
            for s in t.shape:
                if s == "*":
                    shape.extend(self.lead)
                else:
                    shape.append(dim_value(s, self.n, self.C))
            out.append((tuple(shape), self.act_dtype if t.kind == ACT else self.mix_dtype))
        return out

    def unflatten(self, outputs):
        """Reshape kernel outputs ``(T, ...)`` back to the caller's leading dims."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        res = []
        for t, o in zip(self.spec.outputs, outputs):
            if t.shape and t.shape[0] == "*" and len(self.lead) != 1:
                o = o.reshape(tuple(self.lead) + tuple(o.shape[1:]))
            res.append(o)
        return res[0] if len(res) == 1 else tuple(res)


def _fail(spec: OpSpec, msg: str, cls=MHCInputError):
    raise cls(f"mhc.{spec.name}: {msg}")


def _check_scalar(spec: OpSpec, arg, value):
    if arg.kind in (ITERS, COUNT):
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(spec, f"argument '{arg.name}' must be an int; got {type(value).__name__} {value!r}", MHCDtypeError)
        if value < 1:
            what = "the number of Sinkhorn rounds" if arg.kind == ITERS else "the number of streams"
            _fail(spec, f"argument '{arg.name}' ({what}) must be >= 1; got {value}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(spec, f"argument '{arg.name}' must be a float; got {type(value).__name__} {value!r}", MHCDtypeError)
    if not math.isfinite(value):
        _fail(spec, f"argument '{arg.name}' must be finite; got {value!r}")
    if arg.kind == EPS and value < 0:
        _fail(spec, f"argument '{arg.name}' must be >= 0; got {value!r}")
    assert arg.kind in (EPS, REAL), arg.kind


def _solve_n_from_m(spec, name, m):
    n = math.isqrt(int(m) + 1) - 1
    if n < 1 or n * (n + 2) != m:
        _fail(spec, f"argument '{name}' must have last dim m = n*(n+2) for a stream count n >= 1 "
                    f"(3, 8, 15, 24, 35, 48, 63, 80, ...); got {int(m)}")
    return n


def bind(spec: OpSpec, args, *, flatten: bool = True) -> Call:
    """Validate ``args`` (in schema order) against ``spec``; see the module docstring."""
    if len(args) != len(spec.args):
        _fail(spec, f"expected {len(spec.args)} arguments ({', '.join(spec.arg_names)}); got {len(args)}")

    # -- the primary tensor fixes the device, the dtypes, the leading dims, n and C
    p_idx = spec.primary_index
    p_arg: TensorArg = spec.args[p_idx]
    prim = args[p_idx]
    if not isinstance(prim, torch.Tensor):
        _fail(spec, f"argument '{p_arg.name}' must be a torch.Tensor of shape {format_template(p_arg.shape)}; "
                    f"got {type(prim).__name__}")
    device = prim.device
    if p_arg.kind == ACT:
        act_dtype = prim.dtype
        if act_dtype == torch.float64:
            mix_dtype = torch.float64
        elif act_dtype in ACT_DTYPES:
            mix_dtype = torch.float32
        else:
            _fail(spec, f"argument '{p_arg.name}' must be {_ACT_NAMES} (float64 is accepted by the reference "
                        f"backend); got {act_dtype}", MHCDtypeError)
    else:
        act_dtype = None
        mix_dtype = prim.dtype
        if mix_dtype not in (torch.float32, torch.float64):
            _fail(spec, f"argument '{p_arg.name}' must be float32 (float64 on the reference backend); "
                        f"got {mix_dtype}", MHCDtypeError)

    trailing = p_arg.shape[1:]
    if prim.dim() < len(trailing):
        _fail(spec, f"argument '{p_arg.name}' must have shape {format_template(p_arg.shape)} "
                    f"(at least {len(trailing)} dims); got {tuple(prim.shape)}")
    n = C = None
    n_lead = prim.dim() - len(trailing)
    lead = tuple(prim.shape[:n_lead])
    for sym, size in zip(trailing, prim.shape[n_lead:]):
        if sym == "n":
            if n is None:
                n = size
            elif size != n:
                _fail(spec, f"argument '{p_arg.name}' must have shape {format_template(p_arg.shape)} "
                            f"(square in its last two dims); got {tuple(prim.shape)}")
        elif sym == "C":
            C = size
        elif sym == "m":
            n = _solve_n_from_m(spec, p_arg.name, size)
    # scalars (expand's stream count binds n)
    for a, v in zip(spec.args, args):
        if not isinstance(a, TensorArg):
            _check_scalar(spec, a, v)
            if a.kind == COUNT:
                n = v
    if n is not None and n < 1:
        _fail(spec, f"argument '{p_arg.name}' has n = {n} streams (shape {tuple(prim.shape)}); n must be >= 1")
    if C is not None and C < 1:
        _fail(spec, f"argument '{p_arg.name}' has hidden width C = {C} (shape {tuple(prim.shape)}); C must be >= 1")
    n_ = 1 if n is None else n
    C_ = 1 if C is None else C

    T = 1
    for s in lead:
        T = T * s

    # -- every other tensor argument
    out_args = list(args)
    for i, (a, v) in enumerate(zip(spec.args, args)):
        if not isinstance(a, TensorArg):
            continue
        if v is None:
            if not a.optional:
                _fail(spec, f"argument '{a.name}' is required (shape {format_template(a.shape)}); got None")
            continue
        if i != p_idx:
            if not isinstance(v, torch.Tensor):
                _fail(spec, f"argument '{a.name}' must be a torch.Tensor of shape {format_template(a.shape)}; "
                            f"got {type(v).__name__}")
            if v.device != device:
                _fail(spec, f"argument '{a.name}' is on {v.device} but '{p_arg.name}' is on {device}; "
                            f"all tensors must be on one device")
            want = act_dtype if a.kind == ACT else mix_dtype
            if v.dtype != want:
                if a.kind == ACT:
                    why = f"the dtype of '{p_arg.name}'"
                elif mix_dtype == torch.float64:
                    why = "float64 alongside a float64 residual"
                else:
                    why = "the mixing math is float32"
                _fail(spec, f"argument '{a.name}' must be {want} ({why}); got {v.dtype}", MHCDtypeError)
            expected = []
            for s in a.shape:
                if s == "*":
                    expected.extend(lead)
                else:
                    expected.append(dim_value(s, n_, C_))
            if v.shape != tuple(expected):
                sizes = ", ".join(f"{k}={val}" for k, val in (("n", n), ("C", C)) if val is not None)
                _fail(spec, f"argument '{a.name}' must have shape {format_template(a.shape)} = {tuple(expected)} "
                            f"to match '{p_arg.name}' of shape {tuple(prim.shape)} ({sizes}); got {tuple(v.shape)}")
        if flatten:
            if a.shape and a.shape[0] == "*" and len(lead) != 1:
                v = v.reshape((T,) + tuple(v.shape[len(lead):]))
            out_args[i] = v.contiguous()
    return Call(spec, out_args, T, n, C, lead, act_dtype, mix_dtype, device)
