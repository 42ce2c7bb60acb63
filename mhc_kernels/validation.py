"""Input validation at the public boundary, driven by the op specs.

:func:`bind` checks one call's arguments against its :class:`~mhc_kernels.specs.OpSpec`
(types, dtypes, devices, shapes, scalar ranges), binds the symbols ``n``, ``C`` and
the leading dims from the spec's primary tensor (and the free symbols ``r``, ``L`` from
the first tensor that has them), and returns a :class:`Call` whose tensors are
flattened to ``(T, ...)`` (``(L, T, ...)`` for per-layer tensors) and contiguous.
Backends only ever see such canonical tensors. Errors name the operator, the
argument, what was expected and what was given.

The same function runs on fake tensors (shape-only, possibly symbolic), so tracing
under ``torch.compile`` reports the same errors as eager execution.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .errors import MHCDtypeError, MHCInputError
from .specs import (
    ACT,
    ACT_DTYPES,
    COUNT,
    EPS,
    FP8,
    FP8_BITS,
    FP8_DTYPE,
    FP8_FORMATS,
    FP8_GROUPS,
    FP8_OPT,
    FP8_SCALE,
    FREE_SYMBOLS,
    GROUP,
    ITERS,
    MAX_SINKHORN_ITERS,
    POS,
    SPECS,
    OpSpec,
    ScalarArg,
    TensorArg,
    dim_value,
    format_template,
    fp8_group_of,
    fp8_scale_dtype,
    fp8_sizes,
    token_axis,
)

_ACT_NAMES = "bfloat16, float16 or float32"
_ITERS_NAMES = ("sinkhorn_iters", "iters")


# bytes: the widest vector access a backend's kernels make (uint4 / float4). A tensor aligned to less than this (a
# view at a storage offset: fresh allocations are 64-byte aligned on the CPU, 512 on CUDA) is noted in its Call
MAX_ALIGNMENT = 16


class Call:
    """One validated call: canonical (flattened, contiguous) arguments plus the bound sizes.

    ``sizes`` holds the free symbols (``r``: fn's rows, ``L``: layers) the call bound; ``iters``
    is its Sinkhorn round count (``None`` for an op without one). A call *derived* for a part of a
    composite (:meth:`derive`) has the sizes but no arguments (``args is None``): enough for
    config functions and ``supports``.
    """

    __slots__ = ("spec", "args", "T", "n", "C", "lead", "act_dtype", "mix_dtype", "device", "sizes", "iters",
                 "alignment")

    def __init__(self, spec, args, T, n, C, lead, act_dtype, mix_dtype, device, sizes=None, iters=None,
                 alignment=()):
        self.spec = spec
        self.args = args
        self.T = T
        self.n = n
        self.C = C
        self.lead = lead
        self.act_dtype = act_dtype
        self.mix_dtype = mix_dtype
        self.device = device
        self.sizes = sizes or {}
        self.iters = iters
        # ((argument name, its data pointer's alignment, its rows' alignment), ...) in bytes (powers of two) for
        # every tensor argument whose data pointer is less than MAX_ALIGNMENT aligned (a view at a storage offset),
        # alignments capped at MAX_ALIGNMENT: for kernels whose vector accesses need aligned tensors; () for fresh
        # allocations
        self.alignment = alignment

    @property
    def dtype(self) -> torch.dtype:
        """The dtype that selects kernels: the residual's, or the mixes' for ops without one."""
        return self.act_dtype if self.act_dtype is not None else self.mix_dtype

    @property
    def rows(self) -> Optional[int]:
        """fn's row count (``m`` for a site, ``n`` for the head), ``None`` for an op without ``fn``."""
        return self.sizes.get("r")

    def derive(self, op: str, *, rows: Optional[int] = None) -> "Call":
        """The call of op ``op`` that a composite makes for one of its parts: same tokens, streams and
        width (``C`` only where the op has a hidden dim), the residual dtype only where it has a residual."""
        spec = SPECS[op]
        syms = {s for a in spec.tensor_args for s in a.shape}
        sizes = {}
        if "r" in syms:
            sizes["r"] = rows if rows is not None else (self.n or 1) * ((self.n or 1) + 2)
        if "L" in syms:
            sizes["L"] = self.sizes.get("L", 1)
        iters = self.iters if any(a.name in _ITERS_NAMES for a in spec.args) else None
        return Call(spec, None, self.T, self.n, self.C if "C" in syms or "K" in syms else None, (self.T,),
                    self.act_dtype if spec.has_act else None, self.mix_dtype, self.device, sizes, iters,
                    self.alignment)

    def output_shapes(self):
        """Shapes (with the original leading dims) and dtypes of the spec's outputs."""
        out = []
        for t in self.spec.outputs:
            if t.kind == FP8_SCALE:
                dtype = fp8_scale_dtype(fp8_group_of(self.C or 1, self.sizes.get("G", 0)))
            else:
                dtype = {ACT: self.act_dtype, FP8: FP8_DTYPE, FP8_BITS: torch.uint8}.get(t.kind, self.mix_dtype)
            out.append((_full_shape(t.shape, self.lead, self.n, self.C, self.sizes), dtype))
        return out

    def unflatten(self, outputs):
        """Reshape kernel outputs ``(T, ...)`` / ``(L, T, ...)`` back to the caller's leading dims."""
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        res = []
        for t, o in zip(self.spec.outputs, outputs):
            at = _token_axis(t.shape)
            if at is not None and len(self.lead) != 1:
                o = o.reshape(tuple(o.shape[:at]) + tuple(self.lead) + tuple(o.shape[at + 1:]))
            res.append(o)
        return res[0] if len(res) == 1 else tuple(res)


_token_axis = token_axis


def _full_shape(shape, lead, n, C, sizes) -> tuple:
    out = []
    for s in shape:
        if s == "*":
            out.extend(lead)
        else:
            out.append(dim_value(s, n, C, sizes))
    return tuple(out)


def _fail(spec: OpSpec, msg: str, cls=MHCInputError):
    raise cls(f"mhc.{spec.name}: {msg}")


def _check_scalar(where: str, arg, value):
    """``value`` against the value class of ``arg`` (a :class:`~mhc_kernels.specs.ScalarArg`); errors start
    with ``where`` (``mhc.<op>`` at the op boundary, the module's name at construction)."""
    if arg.kind in (GROUP, FP8_OPT):   # an FP8 group along C; a boundary's fp8_group may also be 0 (no copy)
        if isinstance(value, bool) or not isinstance(value, int) or value not in (
                FP8_GROUPS if arg.kind == GROUP else (0,) + FP8_GROUPS):
            names = ", ".join(f"{g} ({f!r})" for f, g in FP8_FORMATS.items())
            what = ("(the FP8 group along C) must be one of " if arg.kind == GROUP else
                    "(the FP8 layer input's group along C) must be 0 (no FP8 copy), ")
            _raise(where, f"argument '{arg.name}' {what}{names}; got {value!r}",
                   MHCDtypeError if isinstance(value, bool) or not isinstance(value, int) else MHCInputError)
        return
    if arg.kind in (ITERS, COUNT):
        if isinstance(value, bool) or not isinstance(value, int):
            _raise(where, f"argument '{arg.name}' must be an int; got {type(value).__name__} {value!r}", MHCDtypeError)
        if value < 1:
            what = "the number of Sinkhorn rounds" if arg.kind == ITERS else "the number of streams"
            _raise(where, f"argument '{arg.name}' ({what}) must be >= 1; got {value}")
        if arg.kind == ITERS and value > MAX_SINKHORN_ITERS:
            _raise(where, f"argument '{arg.name}' must be <= {MAX_SINKHORN_ITERS}; got {value} (each round is "
                        f"unrolled into the GPU kernels and replayed by the backward; Sinkhorn has converged to "
                        f"float32 precision long before)")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _raise(where, f"argument '{arg.name}' must be a float; got {type(value).__name__} {value!r}", MHCDtypeError)
    if not math.isfinite(value):
        _raise(where, f"argument '{arg.name}' must be finite; got {value!r}")
    if arg.kind == EPS and value < 0:
        _raise(where, f"argument '{arg.name}' must be >= 0; got {value!r}")
    if arg.kind == POS and value <= 0:
        why = ("it multiplies the post mix" if arg.name == "post_mult" else
               "it guards a division or rsqrt that is 0/0 or rsqrt(0) for an all-zero row or column")
        _raise(where, f"argument '{arg.name}' must be > 0 ({why}); got {value!r}")


def _raise(where: str, msg: str, cls=MHCInputError):
    raise cls(f"{where}: {msg}")


# The constants of a site (contract §1), by name, with their value classes.
CONSTANTS = {a.name: a for a in SPECS["mhc_pre_sp"].args if isinstance(a, ScalarArg)}


def check_constants(where: str, **values) -> None:
    """Validate mHC constants by name (``norm_eps``, ``pre_eps``, ``post_mult``, ``sinkhorn_iters``,
    ``sinkhorn_eps``, ``out_norm_eps``) with the errors the ops raise: modules call it at construction, so a
    bad value fails there and not at the first forward."""
    for name, value in values.items():
        _check_scalar(where, CONSTANTS[name], value)


def check_count(where: str, name: str, value, what: str) -> None:
    """``value`` must be an int >= 1 (``what`` says what it counts, for the message)."""
    if isinstance(value, bool) or not isinstance(value, int):
        _raise(where, f"argument '{name}' ({what}) must be an int; got {type(value).__name__} {value!r}",
               MHCDtypeError)
    if value < 1:
        _raise(where, f"argument '{name}' ({what}) must be >= 1; got {value}")


def _solve_n_from_m(spec, name, m):
    n = math.isqrt(int(m) + 1) - 1
    if n < 1 or n * (n + 2) != m:
        _fail(spec, f"argument '{name}' must have last dim m = n*(n+2) for a stream count n >= 1 "
                    f"(3, 8, 15, 24, 35, 48, 63, 80, ...); got {int(m)}")
    return n


def complete(spec: OpSpec, args, kwargs=None) -> tuple:
    """``args`` (schema order) and ``kwargs`` (by name) as one full argument tuple, the schema defaults
    filled in for what is not given (the dispatcher passes only what the caller gave)."""
    args = tuple(args)
    if len(args) > len(spec.args):
        _fail(spec, f"expected at most {len(spec.args)} arguments ({', '.join(spec.arg_names)}); got {len(args)}")
    kwargs = dict(kwargs or {})
    unknown = [k for k in kwargs if k not in spec.arg_names]
    if unknown:
        _fail(spec, f"unexpected keyword argument(s) {unknown}; the arguments are {', '.join(spec.arg_names)}")
    out = list(args)
    for name in spec.arg_names[len(args):]:
        if name in kwargs:
            out.append(kwargs.pop(name))
        elif name in spec.defaults:
            out.append(spec.defaults[name])
        else:
            _fail(spec, f"missing required argument '{name}' (the required arguments are "
                        f"{', '.join(spec.required)})")
    if kwargs:
        _fail(spec, f"argument(s) {sorted(kwargs)} given twice (by position and by name)")
    return tuple(out)


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
    iters = group = fp8_group = None
    for a, v in zip(spec.args, args):
        if not isinstance(a, TensorArg):
            _check_scalar(f"mhc.{spec.name}", a, v)
            if a.kind == COUNT:
                n = v
            elif a.kind == ITERS:
                iters = v
            elif a.kind == GROUP:
                group = v
            elif a.kind == FP8_OPT:
                fp8_group = v
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
    sizes: dict = {}
    for g in (group, fp8_group):   # FP8 groups along C
        if g and C is not None and C % g:
            fmt = next(f for f, v in FP8_FORMATS.items() if v == g)
            _fail(spec, f"argument '{p_arg.name}' has C = {C} columns (shape {tuple(prim.shape)}), not a multiple of "
                        f"the FP8 group {g} ({fmt!r}): every group must be whole (pad C, or take "
                        f"{'e4m3_g32' if C % 32 == 0 else 'a C that is a multiple of 32'})")
    if group is not None:
        sizes["G"] = (C or 1) // group
    if fp8_group is not None:
        sizes.update(fp8_sizes(C or 1, fp8_group))
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
            _bind_free(spec, a, v, sizes, lead)
            expected = _full_shape(a.shape, lead, n_, C_, sizes)
            if v.shape != expected:
                known = [(k, val) for k, val in (("n", n), ("C", C)) if val is not None]
                known += [(k if k != "r" else "rows", val) for k, val in sizes.items()]
                _fail(spec, f"argument '{a.name}' must have shape {format_template(a.shape)} = {expected} "
                            f"to match '{p_arg.name}' of shape {tuple(prim.shape)} "
                            f"({', '.join(f'{k}={val}' for k, val in known)}); got {tuple(v.shape)}")
        if flatten:
            at = _token_axis(a.shape)
            if at is not None and len(lead) != 1:
                v = v.reshape(tuple(v.shape[:at]) + (T,) + tuple(v.shape[at + len(lead):]))
            out_args[i] = v.contiguous()
    return Call(spec, out_args, T, n, C, lead, act_dtype, mix_dtype, device, sizes, iters,
                _alignment(spec, out_args))


def _alignment(spec, args) -> tuple:
    """((name, data pointer alignment, row alignment), ...) of the tensor arguments whose data pointer is less than
    :data:`MAX_ALIGNMENT` aligned. Alignments are the largest powers of two (at most MAX_ALIGNMENT) dividing the
    address and the byte stride of the first dim; empty tensors, and tensors without storage (as under tracing),
    do not count."""
    out = []
    for a, v in zip(spec.args, args):
        if not isinstance(a, TensorArg) or not isinstance(v, torch.Tensor) or v.numel() == 0:
            continue
        try:
            ptr = v.data_ptr()
        except (RuntimeError, NotImplementedError):   # fake / meta tensors have no address
            continue
        align = min(ptr & -ptr, MAX_ALIGNMENT) if ptr else MAX_ALIGNMENT
        if align < MAX_ALIGNMENT:
            row = (v.stride(0) if v.dim() else 1) * v.element_size()
            out.append((a.name, align, min(row & -row, MAX_ALIGNMENT)))
    return tuple(out)


def _bind_free(spec, a: TensorArg, v: torch.Tensor, sizes: dict, lead) -> None:
    """Bind the free symbols (``r``, ``L``) of ``a``'s shape from ``v`` where not bound yet."""
    for d, sym in enumerate(a.shape):
        if sym not in FREE_SYMBOLS or sym in sizes:
            continue
        at = d if _token_axis(a.shape) is None or d < _token_axis(a.shape) else d + len(lead) - 1
        if v.dim() <= at:
            return  # the shape check that follows reports it
        size = v.shape[at]
        if size < 1:
            what = "projection rows" if sym == "r" else "layers"
            _fail(spec, f"argument '{a.name}' must have at least one of its {what} ({sym} >= 1); "
                        f"got shape {tuple(v.shape)}")
        sizes[sym] = size
