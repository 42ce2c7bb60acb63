"""DTensor support: sharding rules for every ``torch.ops.mhc`` op, derived from the op specs.

Every mHC operator is token-local: each output token depends only on the same token of the inputs and
on the parameters (``fn``, ``scale``, ``base``, the norm weights), which every token shares. So under
DTensor an op runs on the local shards as they are when

* its activations (every tensor whose template has the token dims ``*``) are sharded on a token (leading)
  dim, all on the same one, or replicated, and
* its parameters (the tensors without token dims) are replicated.

The outputs with token dims then carry the token sharding; a backward op's outputs without token dims
(the parameter gradients ``d_fn``, ``d_scale``, ``d_base``, ``d_out_norm_weight``) are sums over the
tokens, so on token-sharded inputs each rank holds a partial sum: they are declared ``Partial("sum")``
and DTensor reduces them when they are read (``full_tensor()``, ``redistribute``, FSDP2's reduction).

A forward op refuses an input sharded on any other dim (``n``, ``C``, the mixes, a layer dim, or any
dim of a parameter) with :class:`~mhc_kernels.errors.MHCInputError`: the projection contracts over the
whole row ``K = n*C`` and the RMS statistic is a mean over it, so such a layout is not a tensor-parallel
layout of mHC but a mistake (or an all-gather of the residual on every call); the error names the
argument, its layout and the supported ones. A backward op accepts the same layouts and lets DTensor
redistribute any other incoming gradient (a refusal there would fail a training step whose forward ran).

Nothing here is a list of argument positions: the rules are generated from
:data:`~mhc_kernels.specs.SPECS` (each tensor's shape template says whether it has token dims and
where they sit), so optional arguments and new ops are covered as the specs grow.

This module is imported lazily: ``import mhc_kernels`` does not import ``torch.distributed.tensor``
(half a second). The rules are registered (:func:`ensure_registered`) as soon as DTensor is in use:
at ``import mhc_kernels`` when ``torch.distributed.tensor`` is already imported, else on the first
mHC call that meets a DTensor (``mhc_kernels.ops.call``, or the fake implementation that DTensor's
sharding propagation runs before it looks the rule up). ``import mhc_kernels.distributed`` registers
them explicitly.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from .errors import MHCError, MHCInputError
from .specs import SPECS, OpSpec, TensorArg, format_template, token_axis

_DTENSOR_MODULE = "torch.distributed.tensor"
_registered = False
_unsupported = False   # this torch has no register_sharding

SUPPORTED_LAYOUTS = ("activations (residual, layer outputs, mixes, ...) sharded on one leading token dim "
                     "(Shard(0) of (T, ...), Shard(0) or Shard(1) of (B, S, ...)) or replicated; parameters "
                     "(fn, scale, base, norm_weight, out_norm_weight) replicated")


def _dtensor_class():
    mod = sys.modules.get(_DTENSOR_MODULE)
    return getattr(mod, "DTensor", None) if mod is not None else None


def has_dtensor(args) -> bool:
    """Whether any of ``args`` is a DTensor (cheap while ``torch.distributed.tensor`` was never imported:
    then there can be none)."""
    cls = _dtensor_class()
    return cls is not None and any(isinstance(a, cls) for a in args)


def ensure_registered() -> bool:
    """Register the sharding rules once ``torch.distributed.tensor`` is in use; returns whether they are
    registered. Cheap after the first call that registers (or finds this torch without ``register_sharding``,
    older than 2.5: then DTensor calls fail in DTensor as before, with its "no sharding strategy" error)."""
    global _unsupported
    if _registered or _unsupported:
        return _registered
    if _dtensor_class() is None:
        return False
    try:
        register()
    except ImportError:
        _unsupported = True
    return _registered


def register() -> None:
    """Register the sharding rule of every op in :data:`~mhc_kernels.specs.SPECS` with DTensor
    (``torch.distributed.tensor.experimental.register_sharding``). Idempotent."""
    global _registered
    if _registered:
        return
    from torch.distributed.tensor.experimental import register_sharding

    from . import ops  # noqa: F401  (the custom ops must exist)

    for name, spec in SPECS.items():
        register_sharding(getattr(torch.ops.mhc, name).default)(_make_rule(spec))
    _registered = True


def call(name: str, *args):
    """Run forward op ``name`` on DTensor arguments: through ``torch.ops.mhc`` (DTensor applies the rules and
    runs the op body on the local shards; the op's registered autograd formula differentiates it). The
    errors of validation and of the rules come out as the package's own error types."""
    ensure_registered()
    spec = SPECS[name]
    cls = _dtensor_class()
    plain = [a.name for a, v in zip(spec.args, args)
             if isinstance(a, TensorArg) and isinstance(v, torch.Tensor) and not isinstance(v, cls)]
    implicit = getattr(torch._C, "_get_dtensor_allow_implicit_replication", lambda: False)()
    if plain and not implicit:   # (under torch.distributed.tensor.experimental.implicit_replication DTensor decides)
        dt = [a.name for a, v in zip(spec.args, args) if isinstance(v, cls)]
        raise MHCInputError(
            f"mhc.{name}: {_names(dt)} {'is a DTensor' if len(dt) == 1 else 'are DTensors'} but {_names(plain)} "
            f"{'is a plain torch.Tensor' if len(plain) == 1 else 'are plain torch.Tensors'}; give every tensor "
            f"argument as a DTensor on the same mesh: parameters replicated (torch.distributed.tensor."
            f"distribute_module(model, mesh) replicates every parameter of a model; DTensor.from_local(t, mesh, "
            f"[Replicate()]) one tensor), activations sharded on a token dim or replicated")
    try:
        return getattr(torch.ops.mhc, name)(*args)
    except RuntimeError as e:  # DTensor wraps what validation or a rule raised
        cause = e.__cause__
        if isinstance(cause, MHCError):
            raise cause from None
        raise


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


# -- the rules --------------------------------------------------------------------------------------------
_token_axis = token_axis


def _dim_name(template, at: Optional[int], lead: int, d: int) -> str:
    """The template symbol of tensor dim ``d`` (``token dim j`` for one of the leading dims)."""
    if at is not None and at <= d < at + lead:
        return f"token dim {d - at}"
    k = d if at is None or d < at else d - lead + 1
    return repr(template[k]) if 0 <= k < len(template) else f"dim {d}"


def _check_layout(spec: OpSpec, arg: TensorArg, dspec, lead: int) -> None:
    """Refuse a forward-op input sharded on a dim the op cannot run locally on."""
    at = _token_axis(arg.shape)
    ndim = dspec.ndim
    for mesh_dim, p in enumerate(dspec.placements):
        if not p.is_shard():
            continue
        d = p.dim % ndim if ndim else p.dim
        if at is not None and at <= d < at + lead:
            continue
        shape = tuple(dspec.shape)
        what = "a parameter, so it must be replicated" if at is None else (
            f"an activation, so it may be sharded only on its token dims ({', '.join(map(str, range(at, at + lead)))}"
            f" here) or replicated" if lead else "an activation without token dims here, so it must be replicated")
        raise MHCInputError(
            f"mhc.{spec.name}: argument '{arg.name}' of shape {shape} {format_template(arg.shape)} is sharded on "
            f"dim {d} ({_dim_name(arg.shape, at, lead, d)}) by {p!r} on mesh dim {mesh_dim} (placements "
            f"{tuple(dspec.placements)}); it is {what}. Supported layouts: {SUPPORTED_LAYOUTS}. mHC cannot be "
            f"split over n or C: the projection contracts over the whole row K = n*C and the RMS statistic is a "
            f"mean over it. Redistribute it first (e.g. .redistribute(mesh, [Replicate()]) or a Shard of a token "
            f"dim), or keep the mHC sites out of the tensor-parallel plan (shard the sequence instead)")


def _make_rule(spec: OpSpec):
    """The ``register_sharding`` function of one op: its acceptable (output, input) placements for one mesh
    dim. Inputs come as DTensor specs (tensors), None (absent optional tensors) or scalars, positionally in
    schema order and then by keyword."""
    backward = spec.name.endswith("_bwd")
    p_lead = len(spec.arg(spec.primary).shape) - 1   # the primary's non-token dims (its template starts with *)

    def rule(*args, **kwargs):
        from torch.distributed.tensor import Partial, Replicate, Shard

        names = list(spec.arg_names[:len(args)]) + list(kwargs)
        values = list(args) + list(kwargs.values())
        given = dict(zip(names, values))
        prim = given.get(spec.primary)
        lead = max(prim.ndim - p_lead, 0) if hasattr(prim, "ndim") else 0
        inputs = []   # (TensorArg or None, present?) in the order DTensor lists the inputs
        for name, value in zip(names, values):
            arg = spec.arg(name)
            tensor = isinstance(arg, TensorArg) and value is not None and hasattr(value, "placements")
            inputs.append(arg if tensor else None)
            if tensor and not backward:
                _check_layout(spec, arg, value, lead)

        def placements(token_dim):
            ins = []
            for arg in inputs:
                if arg is None:
                    ins.append(None)
                    continue
                at = _token_axis(arg.shape)
                ins.append(Replicate() if token_dim is None or at is None else Shard(at + token_dim))
            outs = []
            for out in spec.outputs:
                at = _token_axis(out.shape)
                if token_dim is None:
                    outs.append(Replicate())
                elif at is not None:
                    outs.append(Shard(at + token_dim))
                elif backward:   # a parameter gradient: the local sum over this rank's tokens
                    outs.append(Partial("sum"))
                else:            # a forward output without tokens cannot be computed from a token shard
                    return None
            return outs, ins

        strategies = [placements(None)]
        for j in range(lead):
            s = placements(j)
            if s is not None:
                strategies.append(s)
        return strategies

    rule.__name__ = f"mhc_{spec.name}_sharding"
    rule.__qualname__ = rule.__name__
    return rule


# -- tensor-parallel serving: the sublayer output as per-rank partial sums -----------------------------------
class _ReducePartial(torch.autograd.Function):
    """Forward: the sum over ``group`` of every rank's partial (one all-reduce, out of place); backward: the
    identity (every rank's partial contributed to the sum with weight 1, and the boundary after it runs
    replicated, so each rank's gradient is the full one: Megatron's reduce-from-tensor-parallel region)."""

    @staticmethod
    def forward(ctx, partial, group):
        out = partial.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def reduce_partial(name: str, layer_output: torch.Tensor, group=None) -> torch.Tensor:
    """The full sublayer output from this rank's partial ``layer_output`` (row-parallel output projections
    leave a partial sum on each tensor-parallel rank): ``torch.distributed.all_reduce`` (SUM) over ``group``
    (default: the world), out of place, differentiable (the gradient passes through unchanged).

    The all-reduce runs before the boundary kernel and is not overlapped with it: the new residual is
    ``round(post * y + comb^T x)`` with one rounding, so no part of the boundary can start before ``y`` is
    complete without changing its bits. Raises :class:`~mhc_kernels.errors.MHCInputError` when
    ``torch.distributed`` is not initialised."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise MHCInputError(
            f"mhc.{name}: layer_output_partial=True all-reduces the layer output over the tensor-parallel group, "
            f"but torch.distributed is not initialised (call torch.distributed.init_process_group first, or pass "
            f"the full layer output with layer_output_partial=False)")
    if has_dtensor((layer_output,)):
        raise MHCInputError(
            f"mhc.{name}: layer_output_partial=True takes this rank's partial sum as a plain tensor; got a DTensor "
            f"(a DTensor with a Partial placement is reduced by DTensor itself: pass it with "
            f"layer_output_partial=False)")
    return _ReducePartial.apply(layer_output, group)
