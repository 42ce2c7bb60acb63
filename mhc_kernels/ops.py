"""``torch.ops.mhc.*``: custom-op registration, fake implementations and autograd.

Every op in :data:`~mhc_kernels.specs.SPECS` becomes a functional
``torch.library`` custom op whose schema (with the contract's defaults) is generated from
its spec. Its body validates the call (:func:`~mhc_kernels.validation.bind`) and has
the registry serve it (kernel selection and config resolution, once per call:
:func:`~mhc_kernels.registry.run`); the fake implementation only evaluates the spec's
output shapes (no compilation, no config lookup, no data access).

Autograd formulas are written once per differentiable op (a ``setup``/``backward``
pair registered with :func:`_formula`; every spec marked ``differentiable`` must have
one) and take an ``ops`` namespace for the backward kernels. They are used twice:

* registered on the custom op with ``ops = torch.ops.mhc`` (the path that
  ``torch.compile`` traces: every backward kernel is itself an opaque op);
* in the eager fast path (:func:`call`), an ``autograd.Function`` per op with
  ``ops`` bound to the same bodies called directly. That skips the dispatcher
  (tens of microseconds per call on small inputs, which matters in decode) while
  keeping the math, the saved tensors and the error messages identical. Set
  ``MHC_KERNELS_EAGER_FASTPATH=0`` (or call :func:`set_eager_fastpath`) to route
  every eager call through ``torch.ops.mhc`` as well.

Auxiliary outputs (the raw ``mixes`` and ``rstd`` that ``mhc_pre``/``mhc_head``/
``post_pre``/``norm_fn`` return so their backward need not re-read the residual)
are marked non-differentiable.

Higher-order and forward-mode autograd are refused with :class:`~mhc_kernels.errors.MHCUnsupportedError`
on every path, never answered with a wrong number: a backward run with ``create_graph=True``
(double backward: ``gradgradcheck``, Hessian-vector products, gradient penalties through mHC ops)
raises in the backward formula (grad mode is on there only then); any op called while a
forward-mode level is active (``torch.func.jvp``, ``jacfwd``, ``torch.autograd.forward_ad``)
raises in the op body, which is the one place every path goes through (PyTorch's custom-op
autograd would otherwise drop the tangent silently).
"""

from __future__ import annotations

import os
import types

import torch
import torch.autograd.forward_ad as _forward_ad

from . import distributed, registry
from .errors import MHCUnsupportedError
from .specs import SPECS
from .validation import bind, complete


def _make_body(name: str):
    spec = SPECS[name]

    def body(*args, **kwargs):
        if _forward_ad._current_level >= 0:
            _refuse_forward_ad(name)
        c = bind(spec, complete(spec, args, kwargs) if kwargs or len(args) < len(spec.args) else args)
        return c.unflatten(registry.run(c))

    body.__name__ = f"mhc_{name}"
    body.__qualname__ = body.__name__
    return body


def _refuse_forward_ad(name: str):
    raise MHCUnsupportedError(
        f"mhc.{name}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not supported: the "
        f"mHC kernels have no JVP rule, and a custom op would silently drop the tangent. Use reverse mode "
        f"(backward, torch.autograd.grad, torch.func.vjp / jacrev); for a JVP of the math itself use the float64 "
        f"transcription, mhc_kernels.reference.transcription.")


def _differentiated_again() -> bool:
    """Whether the backward now running will itself be differentiated. Autograd runs a backward formula
    with grad mode on only under ``create_graph=True``; torch.func's reverse transforms always ask for it,
    which is harmless with one level of them (``grad``, ``vjp``, ``jacrev``: the backward runs under the
    top interpreter) and a second derivative when another Grad/Jvp level sits below (``grad(grad(f))``,
    ``hessian``)."""
    if not torch.is_grad_enabled():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or []
    if not stack:
        return True
    higher = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return any(i.key() in higher for i in stack[:-1])


def _first_order_only(name: str, backward):
    """``backward`` refusing a double backward (see :func:`_differentiated_again`)."""
    def wrapped(ops, ctx, *grads):
        if _differentiated_again():
            raise MHCUnsupportedError(
                f"mhc.{name}: double backward (a backward with create_graph=True -- gradgradcheck, Hessian-vector "
                f"products, gradient penalties through mHC ops) is not supported: the backward kernels are not "
                f"differentiable. Run the backward without create_graph; for higher derivatives of the math use "
                f"the float64 transcription, mhc_kernels.reference.transcription.")
        return backward(ops, ctx, *grads)

    return wrapped


def _make_fake(name: str):
    spec = SPECS[name]

    def fake(*args, **kwargs):
        distributed.ensure_registered()  # DTensor's sharding propagation runs this before its rule lookup
        args = complete(spec, args, kwargs)
        c = bind(spec, args, flatten=False)
        like = args[spec.primary_index]
        outs = tuple(like.new_empty(shape, dtype=dtype) for shape, dtype in c.output_shapes())
        return outs[0] if len(outs) == 1 else outs

    return fake


BODIES = {name: _make_body(name) for name in SPECS}
# The backward kernels called directly (eager fast path) -- same bodies as the ops.
_DIRECT = types.SimpleNamespace(**BODIES)


# -- autograd formulas ----------------------------------------------------------
_AUTOGRAD: dict = {}   # op name -> (setup_context, backward(ops, ctx, *grads))


def _formula(name: str):
    """Register the autograd formula of op ``name``: decorates ``setup`` and returns a decorator for
    ``backward`` (``_formula("post")(setup)(backward)``)."""
    def with_setup(setup):
        def with_backward(backward):
            _AUTOGRAD[name] = (setup, _first_order_only(name, backward))
            return backward
        return with_backward
    return with_setup


def _grad_or_none(needed: bool, grad):
    return grad if needed else None


def _unfold_fn_grad(d_fn, fn, norm_weight):
    """Chain rule through the fold fn_eff = fn * norm_weight."""
    if norm_weight is None:
        return d_fn, None
    return d_fn * norm_weight, (d_fn * fn).sum(0)


def _setup_norm_fn(ctx, inputs, output):
    residual, fn, norm_weight, _ = inputs
    mixes, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(residual, fn, norm_weight, mixes, rstd)


@_formula("norm_fn")(_setup_norm_fn)
def _backward_norm_fn(ops, ctx, grad_mixes, _grad_rstd):
    residual, fn, norm_weight, mixes, rstd = ctx.saved_tensors
    d_res, d_fn = ops.norm_fn_bwd(grad_mixes, residual, fn, norm_weight, mixes, rstd)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return d_res, d_fn, d_nw, None


def _setup_split_mixes(ctx, inputs, output):
    mixes, scale, base, _pre_eps, post_mult, iters, eps = inputs
    ctx.consts = (post_mult, iters, eps)
    ctx.save_for_backward(mixes, scale, base)


@_formula("split_mixes")(_setup_split_mixes)
def _backward_split_mixes(ops, ctx, g_pre, g_post, g_comb):
    mixes, scale, base = ctx.saved_tensors
    d_mixes, d_scale, d_base = ops.split_mixes_bwd(g_pre, g_post, g_comb, mixes, scale, base, *ctx.consts)
    return d_mixes, d_scale, d_base, None, None, None, None


def _setup_sinkhorn(ctx, inputs, output):
    logits, iters, eps = inputs
    ctx.consts = (iters, eps)
    ctx.save_for_backward(logits)


@_formula("sinkhorn")(_setup_sinkhorn)
def _backward_sinkhorn(ops, ctx, grad):
    (logits,) = ctx.saved_tensors
    return ops.sinkhorn_bwd(grad, logits, *ctx.consts), None, None


def _setup_pre_apply_mix(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@_formula("pre_apply_mix")(_setup_pre_apply_mix)
def _backward_pre_apply_mix(ops, ctx, grad):
    residual, pre_mix = ctx.saved_tensors
    return ops.pre_apply_mix_bwd(grad, residual, pre_mix)


def _setup_post(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@_formula("post")(_setup_post)
def _backward_post(ops, ctx, grad):
    layer_output, residual, post_mix, comb_mix = ctx.saved_tensors
    return ops.post_bwd(grad, layer_output, residual, post_mix, comb_mix)


def _setup_mhc_pre(ctx, inputs, output):
    (residual, fn, scale, base, norm_weight, out_norm_weight, _norm_eps, pre_eps, post_mult, iters, eps,
     _out_eps, _fp8_group) = inputs
    _li, _post, _comb, mixes, rstd, out_rstd, fp8_codes, fp8_scales = output
    ctx.mark_non_differentiable(mixes, rstd, out_rstd, fp8_codes, fp8_scales)
    ctx.consts = (pre_eps, post_mult, iters, eps)
    # Only the caller's residual (by reference) and O(n^2) floats per token (out_rstd only with the norm).
    ctx.save_for_backward(residual, fn, scale, base, norm_weight, out_norm_weight, mixes, rstd,
                          None if out_norm_weight is None else out_rstd)


@_formula("mhc_pre")(_setup_mhc_pre)
def _backward_mhc_pre(ops, ctx, g_li, g_post, g_comb, *_g_aux):
    residual, fn, scale, base, norm_weight, out_norm_weight, mixes, rstd, out_rstd = ctx.saved_tensors
    d_res, d_fn, d_scale, d_base, d_onw = ops.mhc_pre_bwd(g_li, g_post, g_comb, residual, fn, scale, base,
                                                          norm_weight, out_norm_weight, mixes, rstd, out_rstd, None,
                                                          *ctx.consts)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return ((d_res, d_fn, d_scale, d_base, d_nw, _grad_or_none(out_norm_weight is not None, d_onw))
            + (None,) * 7)


def _setup_expand(ctx, inputs, output):
    pass


@_formula("expand")(_setup_expand)
def _backward_expand(ops, ctx, grad):
    return ops.expand_bwd(grad), None


def _setup_mhc_head(ctx, inputs, output):
    residual, fn, scale, base, norm_weight, _norm_eps, pre_eps = inputs
    _out, mixes, rstd = output
    ctx.mark_non_differentiable(mixes, rstd)
    ctx.pre_eps = pre_eps
    ctx.save_for_backward(residual, fn, scale, base, norm_weight, mixes, rstd)


@_formula("mhc_head")(_setup_mhc_head)
def _backward_mhc_head(ops, ctx, grad, _g_mixes, _g_rstd):
    residual, fn, scale, base, norm_weight, mixes, rstd = ctx.saved_tensors
    d_res, d_fn, d_scale, d_base = ops.mhc_head_bwd(grad, residual, fn, scale, base, norm_weight, mixes, rstd,
                                                    ctx.pre_eps)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return d_res, d_fn, d_scale, d_base, d_nw, None, None


def _setup_post_pre(ctx, inputs, output):
    (layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, out_norm_weight,
     _norm_eps, pre_eps, post_mult, iters, eps, _out_eps, _fp8_group) = inputs
    new_residual, _li, _post, _comb, mixes, rstd, out_rstd, fp8_codes, fp8_scales = output
    ctx.mark_non_differentiable(mixes, rstd, out_rstd, fp8_codes, fp8_scales)
    ctx.consts = (pre_eps, post_mult, iters, eps)
    ctx.save_for_backward(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight,
                          out_norm_weight, new_residual, mixes, rstd, None if out_norm_weight is None else out_rstd)


@_formula("post_pre")(_setup_post_pre)
def _backward_post_pre(ops, ctx, g_new_res, g_li, g_post, g_comb, *_g_aux):
    (layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, out_norm_weight,
     new_residual, mixes, rstd, out_rstd) = ctx.saved_tensors
    # The new residual's gradient flows in directly and through the next pre;
    # mhc_pre_bwd adds both in one pass instead of materialising two tensors.
    d_new, d_fn, d_scale, d_base, d_onw = ops.mhc_pre_bwd(g_li, g_post, g_comb, new_residual, fn, scale, base,
                                                          norm_weight, out_norm_weight, mixes, rstd, out_rstd,
                                                          g_new_res, *ctx.consts)
    d_y, d_res, d_post_mix, d_comb_mix = ops.post_bwd(d_new, layer_output, residual, post_mix, comb_mix)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return ((d_y, d_res, d_post_mix, d_comb_mix, d_fn, d_scale, d_base, d_nw,
             _grad_or_none(out_norm_weight is not None, d_onw)) + (None,) * 7)


# -- single-pass mHC (contract §14) ----------------------------------------------------------------
def _setup_mhc_pre_sp(ctx, inputs, output):
    (residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, _norm_eps, pre_eps, post_mult, iters, eps,
     _out_eps, _fp8_group) = inputs
    _li, _pre, _post, _comb, mixes, rstd, out_rstd, fp8_codes, fp8_scales = output
    ctx.mark_non_differentiable(mixes, rstd, out_rstd, fp8_codes, fp8_scales)
    ctx.consts = (pre_eps, post_mult, iters, eps)
    # Only the caller's residual (by reference) and O(n^2) floats per token, as mhc_pre.
    ctx.save_for_backward(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, mixes, rstd, out_rstd)


@_formula("mhc_pre_sp")(_setup_mhc_pre_sp)
def _backward_mhc_pre_sp(ops, ctx, g_li, g_pre, g_post, g_comb, *_g_aux):
    residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, mixes, rstd, out_rstd = ctx.saved_tensors
    d_res, d_prev, d_fn, d_scale, d_base, d_onw = ops.mhc_pre_sp_bwd(
        g_li, g_pre, g_post, g_comb, residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, mixes, rstd,
        out_rstd, None, *ctx.consts)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return ((d_res, _grad_or_none(prev_pre is not None, d_prev), d_fn, d_scale, d_base, d_nw,
             _grad_or_none(out_norm_weight is not None, d_onw)) + (None,) * 7)


def _setup_post_pre_sp(ctx, inputs, output):
    (layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight, out_norm_weight,
     _norm_eps, pre_eps, post_mult, iters, eps, _out_eps, _fp8_group) = inputs
    new_residual, _li, _pre, _post, _comb, mixes, rstd, out_rstd, fp8_codes, fp8_scales = output
    ctx.mark_non_differentiable(mixes, rstd, out_rstd, fp8_codes, fp8_scales)
    ctx.consts = (pre_eps, post_mult, iters, eps)
    ctx.save_for_backward(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
                          out_norm_weight, new_residual, mixes, rstd, out_rstd)


@_formula("post_pre_sp")(_setup_post_pre_sp)
def _backward_post_pre_sp(ops, ctx, g_new_res, g_li, g_pre, g_post, g_comb, *_g_aux):
    (layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight, out_norm_weight,
     new_residual, mixes, rstd, out_rstd) = ctx.saved_tensors
    # as post_pre: the new residual's two gradients (direct, through the next pre) are summed by the pre backward
    d_new, d_prev, d_fn, d_scale, d_base, d_onw = ops.mhc_pre_sp_bwd(
        g_li, g_pre, g_post, g_comb, new_residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, mixes,
        rstd, out_rstd, g_new_res, *ctx.consts)
    d_y, d_res, d_post_mix, d_comb_mix = ops.post_bwd(d_new, layer_output, residual, post_mix, comb_mix)
    d_fn, d_nw = _unfold_fn_grad(d_fn, fn, norm_weight)
    return ((d_y, d_res, d_post_mix, d_comb_mix, _grad_or_none(prev_pre is not None, d_prev), d_fn, d_scale, d_base,
             d_nw, _grad_or_none(out_norm_weight is not None, d_onw)) + (None,) * 7)


def _setup_mhc_head_sp(ctx, inputs, output):
    residual, pre, out_norm_weight, _out_eps = inputs
    _out, out_rstd = output
    ctx.mark_non_differentiable(out_rstd)
    ctx.save_for_backward(residual, pre, out_norm_weight, out_rstd)


@_formula("mhc_head_sp")(_setup_mhc_head_sp)
def _backward_mhc_head_sp(ops, ctx, grad, _g_out_rstd):
    residual, pre, out_norm_weight, out_rstd = ctx.saved_tensors
    d_res, d_pre, d_onw = ops.mhc_head_sp_bwd(grad, residual, pre, out_norm_weight, out_rstd)
    return d_res, d_pre, _grad_or_none(out_norm_weight is not None, d_onw), None


_missing = [name for name, spec in SPECS.items() if spec.differentiable and name not in _AUTOGRAD]
if _missing:
    raise RuntimeError(f"mhc_kernels.ops: no autograd formula for the differentiable ops {_missing}")


# -- registration ---------------------------------------------------------------
OPS: dict[str, torch.library.CustomOpDef] = {}
for _name, _spec in SPECS.items():
    _op = torch.library.custom_op(f"mhc::{_name}", BODIES[_name], mutates_args=(), schema=_spec.schema())
    _op.register_fake(_make_fake(_name))
    if _name in _AUTOGRAD:
        _setup, _backward = _AUTOGRAD[_name]
        _op.register_autograd(
            (lambda bw: lambda ctx, *grads: bw(torch.ops.mhc, ctx, *grads))(_backward), setup_context=_setup)
    OPS[_name] = _op
distributed.ensure_registered()  # the DTensor sharding rules, if torch.distributed.tensor is imported


def _make_function(name: str):
    setup, backward = _AUTOGRAD[name]
    body = BODIES[name]

    def forward(*args):
        return body(*args)

    def bwd(ctx, *grads):
        return backward(_DIRECT, ctx, *grads)

    return type(f"{name}_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(bwd),
    })


FUNCTIONS = {name: _make_function(name) for name in _AUTOGRAD}

_fastpath = os.environ.get("MHC_KERNELS_EAGER_FASTPATH", "1").strip().lower() not in ("0", "false", "no", "off")


def set_eager_fastpath(enabled: bool) -> None:
    """Turn the eager fast path on (default) or off; see the module docstring.

    Example::

        >>> mk.set_eager_fastpath(False)          # every eager call goes through torch.ops.mhc
        >>> mk.eager_fastpath_enabled()
        False
        >>> mk.set_eager_fastpath(True)
    """
    global _fastpath
    _fastpath = bool(enabled)


def eager_fastpath_enabled() -> bool:
    return _fastpath


def call(name: str, *args):
    """Run forward op ``name``: through ``torch.ops.mhc`` when compiling (or with the fast
    path off), else through the equivalent ``autograd.Function`` or, when no gradient
    is needed (or the op has none), the op body itself."""
    if not torch.compiler.is_compiling() and distributed.has_dtensor(args):
        return distributed.call(name, *args)  # DTensor: torch.ops.mhc with the sharding rules
    if _fastpath and not torch.compiler.is_compiling():
        if (name in FUNCTIONS and torch.is_grad_enabled()
                and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)):
            return FUNCTIONS[name].apply(*args)
        return BODIES[name](*args)
    return getattr(torch.ops.mhc, name)(*args)
