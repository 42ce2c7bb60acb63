"""The composite operators, written once from a backend's primitive kernels (contract §6-§8).

Every backend computes the composites with the same sequence of primitives:

* ``mhc_pre``  = norm_fn -> split_mixes -> pre_apply_mix (the residual read twice); with the sublayer's
  RMSNorm (``out_norm_weight``) the collapse is ``mhc_head_sp``'s kernel (collapse + norm in one);
* ``mhc_pre_bwd`` = stream_weight_grad (``d_pre[t, i] = <g[t], x[t, i]>``) -> split_mixes_bwd ->
  norm_fn_bwd with the collapse's term ``pre (x) g`` and an incoming residual gradient added in
  float32 before the single rounding (one full-size write);
* ``mhc_head`` / ``mhc_head_bwd`` = the same with ``n`` projection rows and sigmoid weights;
* ``post_pre`` = post -> mhc_pre on the stored new residual;
* with ``fp8_group`` the forward boundaries end with ``quantize_fp8`` of the layer input (the FP8 copy; a
  backend that fuses it into the kernel writing the layer input overrides the composite);
* ``multilayer_recompute`` = per layer pre_apply_mix and post writing into the output slices.

A backend registers its primitives, then calls :func:`register_composites`, which registers
each composite for it built from those primitives -- except the ones it passes as
*overrides*: kernels that really fuse (TileLang's mhc_pre tail, its post fused into the
projection). So a backend's registration is the one place that says what it fuses.

Configs. A composite's config holds one sub-config per part, keyed by part name, e.g.
``{"norm_fn": {...}, "split_mixes": {...}, "pre_apply_mix": {...}}``; its default is each part's
default for the part's call (:meth:`~mhc_kernels.validation.Call.derive`), its space the default
plus, part by part, the default with that part's config replaced by each point of the part's
own space. The core resolves it once per call like any kernel's config (the composite's
stored entry, else the default; ``registry.config_for``), and the composite hands each part
its sub-config -- so the tuner tunes, and the store holds, exactly what one call runs.

Also here: the per-token gate math the backends and ``mhc_kernels.nn`` share (scale vector,
gate logits, the pre-mix, the head's weights), written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from . import registry
from .errors import BackendError
from .specs import fp8_scale_dtype, mix_count, stream_count

Tensor = torch.Tensor


# -- the gate math (contract §3, §7) ------------------------------------------------------------
def scale_vector(scale: Tensor, n: int) -> Tensor:
    """s = [scale0]*n + [scale1]*n + [scale2]*n*n  (length m)."""
    return torch.cat([scale[0:1].expand(n), scale[1:2].expand(n), scale[2:3].expand(n * n)])


def gate_logits(mixes: Tensor, scale: Tensor, base: Tensor, n: int) -> Tensor:
    """z = mixes * s + base  (``(..., m)``)."""
    return torch.addcmul(base, mixes, scale_vector(scale, n))


def split_gates(z: Tensor, n: int, pre_eps: float, post_mult: float):
    """-> (pre_mix = sigmoid(z[:n]) + pre_eps, post_mix = sigmoid(z[n:2n]) * post_mult, residual-mix logits
    z[2n:] as ``(..., n, n)``)."""
    pre = torch.sigmoid(z[..., :n]) + pre_eps
    post = torch.sigmoid(z[..., n:2 * n]) * post_mult
    return pre, post, z[..., 2 * n:].unflatten(-1, (n, n))


def pre_mix(mixes: Tensor, scale: Tensor, base: Tensor, pre_eps: float) -> Tensor:
    """The pre-mix ``(..., n)`` from the raw mixes, computed as split_mixes computes it (bit for bit on the
    reference): sigmoid(mixes[:n] * scale0 + base[:n]) + pre_eps."""
    n = stream_count(base.shape[0])
    return torch.sigmoid(gate_logits(mixes, scale, base, n)[..., :n]) + pre_eps


def head_weights(mixes: Tensor, scale: Tensor, base: Tensor, pre_eps: float):
    """-> (z = mixes * scale + base, w = sigmoid(z) + pre_eps): the head's logits and stream weights ``(..., n)``."""
    z = torch.addcmul(base, mixes, scale)
    return z, torch.sigmoid(z) + pre_eps


def dsigmoid(z: Tensor) -> Tensor:
    """sigmoid'(z) = sigmoid(z) * sigmoid(-z); unlike s * (1 - s) it keeps full precision when saturated."""
    return torch.sigmoid(z) * torch.sigmoid(-z)


# -- the composites ---------------------------------------------------------------------------------
def _sub(config, part):
    return None if config is None else config.get(part)


def fp8_copy(p, layer_input: Tensor, fp8_group: int, config=None) -> tuple[Tensor, Tensor]:
    """-> (fp8_codes (T, C) uint8: the float8_e4m3fn bytes, fp8_scales as stored: ``specs.fp8_scale_dtype``) of a
    boundary: ``quantize_fp8`` of the stored layer input with ``fp8_group`` (the backend's kernel: one more
    launch), or ``(T, 0)`` placeholders without a group (``fp8_group == 0``)."""
    if not fp8_group:
        T = layer_input.shape[0]
        return (torch.empty((T, 0), dtype=torch.uint8, device=layer_input.device),
                torch.empty((T, 0), dtype=fp8_scale_dtype(0), device=layer_input.device))
    codes, scales = p.quantize_fp8(layer_input, fp8_group, config=_sub(config, "quantize_fp8"))
    return codes.view(torch.uint8), scales


def mhc_pre_fwd(p, residual, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult, iters,
                sinkhorn_eps, out_norm_eps, fp8_group, *, config=None):
    """-> (layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales): norm_fn ->
    split_mixes -> pre_apply_mix, or, with ``out_norm_weight``, the collapse and the sublayer's RMSNorm in one
    kernel (``mhc_head_sp``'s: the statistic of the rounded collapse; ``out_rstd`` its rho, ones without a
    weight); with ``fp8_group`` then ``quantize_fp8`` of the layer input (:func:`fp8_copy`)."""
    mixes, rstd = p.norm_fn(residual, fn, norm_weight, norm_eps, config=_sub(config, "norm_fn"))
    pre, post, comb = p.split_mixes(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps,
                                    config=_sub(config, "split_mixes"))
    if out_norm_weight is None:
        v, out_rstd = out_norm(p.pre_apply_mix(residual, pre, config=_sub(config, "pre_apply_mix")), None, 0.0,
                               fn.dtype)
    else:
        v, out_rstd = p.collapse_norm(residual, pre, out_norm_weight, out_norm_eps,
                                      config=_sub(config, "collapse_norm"))
    return (v, post, comb, mixes, rstd, out_rstd) + fp8_copy(p, v, fp8_group, config)


def mhc_pre_bwd(p, grad_layer_input, grad_post, grad_comb, residual, fn, scale, base, norm_weight, out_norm_weight,
                mixes, rstd, out_rstd, grad_residual, pre_eps, post_mult, iters, sinkhorn_eps, *, config=None):
    """-> (d_residual, d_fn_eff, d_scale, d_base, d_out_norm_weight); the residual gradient's three terms
    (incoming, the collapse's ``pre (x) g_u``, the projection's) are summed in float32 and written once. With
    an out-norm, ``g_u`` is the norm's backward of ``grad_layer_input`` at the recomputed collapse (one more
    read of the residual, as mhc_pre_sp_bwd)."""
    pre = pre_mix(mixes, scale, base, pre_eps)
    g_u, d_onw = grad_layer_input, None
    if out_norm_weight is not None:
        u = p.pre_apply_mix(residual, pre, config=_sub(config, "pre_apply_mix"))
        g_u, d_onw = out_norm_bwd(grad_layer_input, u, out_norm_weight, out_rstd)
    d_pre = p.stream_weight_grad(g_u, residual, config=_sub(config, "stream_weight_grad"))
    d_mixes, d_scale, d_base = p.split_mixes_bwd(d_pre, grad_post, grad_comb, mixes, scale, base, post_mult, iters,
                                                 sinkhorn_eps, config=_sub(config, "split_mixes_bwd"))
    d_res, d_fn = p.norm_fn_bwd(d_mixes, residual, fn, norm_weight, mixes, rstd, apply_w=pre,
                                apply_grad=g_u, grad_residual=grad_residual,
                                config=_sub(config, "norm_fn_bwd"))
    if d_onw is None:
        d_onw = torch.zeros(residual.shape[-1:], dtype=fn.dtype, device=residual.device)
    return d_res, d_fn, d_scale, d_base, d_onw


def mhc_head_fwd(p, residual, fn, scale, base, norm_weight, norm_eps, pre_eps, *, config=None):
    """-> (out, mixes (T, n), rstd): out = sum_i (sigmoid(norm_fn(x) * scale + base) + pre_eps)_i x_i."""
    mixes, rstd = p.norm_fn(residual, fn, norm_weight, norm_eps, config=_sub(config, "norm_fn"))
    _, w = head_weights(mixes, scale, base, pre_eps)
    return p.pre_apply_mix(residual, w, config=_sub(config, "pre_apply_mix")), mixes, rstd


def mhc_head_bwd(p, grad, residual, fn, scale, base, norm_weight, mixes, rstd, pre_eps, *, config=None):
    """-> (d_residual, d_fn_eff, d_scale (1,), d_base (n,)); the residual gradient is written once."""
    z, w = head_weights(mixes, scale, base, pre_eps)
    d_z = p.stream_weight_grad(grad, residual, config=_sub(config, "stream_weight_grad")) * dsigmoid(z)
    d_res, d_fn = p.norm_fn_bwd(d_z * scale, residual, fn, norm_weight, mixes, rstd, apply_w=w, apply_grad=grad,
                                config=_sub(config, "norm_fn_bwd"))
    return d_res, d_fn, (d_z * mixes).sum().reshape(1), d_z.sum(0)


def post_pre_fwd(p, layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, out_norm_weight,
                 norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, *, config=None):
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales) of the next
    sublayer: post, then mhc_pre on the stored new residual."""
    new_residual = p.post(layer_output, residual, post_mix, comb_mix, config=_sub(config, "post"))
    return (new_residual,) + p.mhc_pre(new_residual, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                                       pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group,
                                       config=_sub(config, "mhc_pre"))


def multilayer_recompute_fwd(p, residual, layer_outputs, pre_mix, post_mix, comb_mix, *, config=None):
    """-> (residuals (L, T, n, C), layer_inputs (L, T, C)) of L consecutive sites from x_0 (contract §8).

    ``residuals[l] = x_l`` (x_0 copied), ``layer_inputs[l] = pre_apply_mix(x_l, pre_mix[l])`` and
    ``x_{l+1} = post(layer_outputs[l], x_l, post_mix[l], comb_mix[l])``, each written straight into its
    slice of the output buffers (no copies) and so stored in the residual dtype before it is read again.
    Per layer x_l is read twice (collapse, post) and x_{l+1} and the layer input written once. The last
    site's output and post/comb mixes are not read.
    """
    L = layer_outputs.shape[0]
    T, n, C = residual.shape
    residuals = residual.new_empty((L, T, n, C))
    layer_inputs = residual.new_empty((L, T, C))
    residuals[0].copy_(residual)
    for layer in range(L):
        x = residuals[layer]
        p.pre_apply_mix(x, pre_mix[layer], config=_sub(config, "pre_apply_mix"), out=layer_inputs[layer])
        if layer + 1 < L:
            p.post(layer_outputs[layer], x, post_mix[layer], comb_mix[layer], config=_sub(config, "post"),
                   out=residuals[layer + 1])
    return residuals, layer_inputs


# -- single-pass mHC (contract §14) ------------------------------------------------------------------------
def out_norm(u: Tensor, weight: Optional[Tensor], eps: float, mix_dtype: torch.dtype):
    """-> (v, rho): the sublayer's RMSNorm of the stored collapse ``u (T, C)``,
    ``v = round(u * rho * weight)`` with ``rho = rsqrt(mean(u^2) + eps)`` taken from the rounded ``u``;
    without a weight ``v`` is ``u`` and ``rho`` ones (not used)."""
    if weight is None:
        return u, torch.ones(u.shape[:-1], dtype=mix_dtype, device=u.device)
    uf = u.to(mix_dtype)
    rho = torch.rsqrt(torch.linalg.vector_norm(uf, dim=-1).square() / uf.shape[-1] + eps)
    return (uf * rho.unsqueeze(-1) * weight).to(u.dtype), rho


def out_norm_bwd(grad: Tensor, u: Tensor, weight: Optional[Tensor], rho: Tensor):
    """-> (d_u in ``u``'s dtype, d_weight ``(C,)``) of :func:`out_norm` (the rounding of ``v`` as identity):
    ``d_u = rho * (w * g) - (rho^3 / C) * <u, w * g> * u``, ``d_weight = sum_t rho * u * g``."""
    if weight is None:
        return grad, None
    md = rho.dtype
    uf, g = u.to(md), grad.to(md)
    wg = g * weight
    coef = rho.pow(3) / uf.shape[-1] * torch.linalg.vecdot(uf, wg)
    d_u = rho.unsqueeze(-1) * wg - coef.unsqueeze(-1) * uf
    d_w = (uf * rho.unsqueeze(-1) * g).sum(0)
    return d_u.to(u.dtype), d_w


def first_stream(residual: Tensor) -> Tensor:
    """``residual[:, 0]`` as a fresh tensor: the collapse with the one-hot pre on stream 0, bit for bit."""
    return residual[:, 0].clone(memory_format=torch.contiguous_format)


def one_hot_pre(residual: Tensor, mix_dtype: torch.dtype) -> Tensor:
    """The first site's constant pre ``(T, n)``: 1 on stream 0."""
    w = torch.zeros(residual.shape[:2], dtype=mix_dtype, device=residual.device)
    w[:, 0] = 1.0
    return w


def _collapse(p, residual, prev_pre, config):
    return first_stream(residual) if prev_pre is None else p.pre_apply_mix(residual, prev_pre,
                                                                           config=_sub(config, "pre_apply_mix"))


def mhc_pre_sp_fwd(p, residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
                   iters, sinkhorn_eps, out_norm_eps, fp8_group, *, config=None):
    """-> (layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales): this site's
    coefficients from the residual (norm_fn -> split_mixes) and the layer input collapsed with ``prev_pre``
    (stream 0 when None), then RMS-normalised when ``out_norm_weight`` is given, then its FP8 copy with
    ``fp8_group`` (:func:`fp8_copy`)."""
    mixes, rstd = p.norm_fn(residual, fn, norm_weight, norm_eps, config=_sub(config, "norm_fn"))
    pre, post, comb = p.split_mixes(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps,
                                    config=_sub(config, "split_mixes"))
    v, out_rstd = out_norm(_collapse(p, residual, prev_pre, config), out_norm_weight, out_norm_eps, fn.dtype)
    return (v, pre, post, comb, mixes, rstd, out_rstd) + fp8_copy(p, v, fp8_group, config)


def mhc_pre_sp_bwd(p, grad_layer_input, grad_pre, grad_post, grad_comb, residual, prev_pre, fn, scale, base,
                   norm_weight, out_norm_weight, mixes, rstd, out_rstd, grad_residual, pre_eps, post_mult, iters,
                   sinkhorn_eps, *, config=None):
    """-> (d_residual, d_prev_pre, d_fn_eff, d_scale, d_base, d_out_norm_weight). ``grad_pre`` is the next
    site's gradient of this site's pre; the residual gradient's terms (incoming, the collapse's
    ``prev_pre (x) d_u``, the projection's) are summed in float32 and written once, as mhc_pre_bwd's."""
    md = fn.dtype
    g_u = grad_layer_input
    d_onw = None
    if out_norm_weight is not None:
        u = _collapse(p, residual, prev_pre, config)   # recomputed: one more read of the residual
        g_u, d_onw = out_norm_bwd(grad_layer_input, u, out_norm_weight, out_rstd)
    if prev_pre is None:
        d_prev, apply_w = torch.zeros(residual.shape[:2], dtype=md, device=residual.device), one_hot_pre(residual, md)
    else:
        d_prev = p.stream_weight_grad(g_u, residual, config=_sub(config, "stream_weight_grad"))
        apply_w = prev_pre
    d_mixes, d_scale, d_base = p.split_mixes_bwd(grad_pre, grad_post, grad_comb, mixes, scale, base, post_mult, iters,
                                                 sinkhorn_eps, config=_sub(config, "split_mixes_bwd"))
    d_res, d_fn = p.norm_fn_bwd(d_mixes, residual, fn, norm_weight, mixes, rstd, apply_w=apply_w, apply_grad=g_u,
                                grad_residual=grad_residual, config=_sub(config, "norm_fn_bwd"))
    if d_onw is None:
        d_onw = torch.zeros(residual.shape[-1:], dtype=md, device=residual.device)
    return d_res, d_prev, d_fn, d_scale, d_base, d_onw


def post_pre_sp_fwd(p, layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
                    out_norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, *,
                    config=None):
    """-> (new_residual, layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales): post
    of site s-1, then mhc_pre_sp of site s on the stored new residual."""
    new_residual = p.post(layer_output, residual, post_mix, comb_mix, config=_sub(config, "post"))
    return (new_residual,) + p.mhc_pre_sp(new_residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight,
                                          norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group,
                                          config=_sub(config, "mhc_pre_sp"))


def mhc_head_sp_fwd(p, residual, pre, out_norm_weight, out_norm_eps, *, config=None):
    """-> (out, out_rstd): the final residual collapsed with the last site's pre, optionally normalised."""
    u = p.pre_apply_mix(residual, pre, config=_sub(config, "pre_apply_mix"))
    return out_norm(u, out_norm_weight, out_norm_eps, pre.dtype)


def mhc_head_sp_bwd(p, grad, residual, pre, out_norm_weight, out_rstd, *, config=None):
    """-> (d_residual, d_pre, d_out_norm_weight)."""
    g_u, d_onw = grad, None
    if out_norm_weight is not None:
        u = p.pre_apply_mix(residual, pre, config=_sub(config, "pre_apply_mix"))
        g_u, d_onw = out_norm_bwd(grad, u, out_norm_weight, out_rstd)
    d_res, d_pre = p.pre_apply_mix_bwd(g_u, residual, pre, config=_sub(config, "pre_apply_mix_bwd"))
    if d_onw is None:
        d_onw = torch.zeros(residual.shape[-1:], dtype=pre.dtype, device=residual.device)
    return d_res, d_pre, d_onw


# -- parts and registration -------------------------------------------------------------------------------
def _rows_m(call):
    return mix_count(call.n or 1)


def _rows_n(call):
    return call.n or 1


@dataclass(frozen=True)
class Part:
    """One part of a composite: its name (the key of its sub-config), the op whose kernel serves it, and
    the projection rows of its call (``None``: the op's default)."""

    name: str
    op: str
    rows: Optional[Callable] = None

    def call(self, call):
        return call.derive(self.op, rows=None if self.rows is None else self.rows(call))


# A part that is not an op: d_w[t, i] = <g[t], x[t, i]>, i.e. pre_apply_mix_bwd without d_residual (its
# call is pre_apply_mix_bwd's). Each backend passes its kernel to register_composites.
STREAM_WEIGHT_GRAD = "stream_weight_grad"

# Order matters: a composite that uses another (mhc_pre uses mhc_head_sp's collapse + norm kernel, post_pre uses
# mhc_pre) comes after it, so register_composites finds the inner one's kernel registered.
COMPOSITES: dict[str, tuple[Callable, tuple[Part, ...]]] = {
    "mhc_head_sp": (mhc_head_sp_fwd, (Part("pre_apply_mix", "pre_apply_mix"),)),
    "mhc_pre": (mhc_pre_fwd, (Part("norm_fn", "norm_fn", _rows_m), Part("split_mixes", "split_mixes"),
                              Part("pre_apply_mix", "pre_apply_mix"), Part("collapse_norm", "mhc_head_sp"),
                              Part("quantize_fp8", "quantize_fp8"))),
    "mhc_pre_bwd": (mhc_pre_bwd, (Part("pre_apply_mix", "pre_apply_mix"),
                                  Part(STREAM_WEIGHT_GRAD, "pre_apply_mix_bwd"),
                                  Part("split_mixes_bwd", "split_mixes_bwd"),
                                  Part("norm_fn_bwd", "norm_fn_bwd", _rows_m))),
    "mhc_head": (mhc_head_fwd, (Part("norm_fn", "norm_fn", _rows_n), Part("pre_apply_mix", "pre_apply_mix"))),
    "mhc_head_bwd": (mhc_head_bwd, (Part(STREAM_WEIGHT_GRAD, "pre_apply_mix_bwd"),
                                    Part("norm_fn_bwd", "norm_fn_bwd", _rows_n))),
    "post_pre": (post_pre_fwd, (Part("post", "post"), Part("mhc_pre", "mhc_pre"))),
    "multilayer_recompute": (multilayer_recompute_fwd, (Part("post", "post"), Part("pre_apply_mix", "pre_apply_mix"))),
    "mhc_pre_sp": (mhc_pre_sp_fwd, (Part("norm_fn", "norm_fn", _rows_m), Part("split_mixes", "split_mixes"),
                                    Part("pre_apply_mix", "pre_apply_mix"), Part("quantize_fp8", "quantize_fp8"))),
    "mhc_pre_sp_bwd": (mhc_pre_sp_bwd, (Part("pre_apply_mix", "pre_apply_mix"),
                                        Part(STREAM_WEIGHT_GRAD, "pre_apply_mix_bwd"),
                                        Part("split_mixes_bwd", "split_mixes_bwd"),
                                        Part("norm_fn_bwd", "norm_fn_bwd", _rows_m))),
    "post_pre_sp": (post_pre_sp_fwd, (Part("post", "post"), Part("mhc_pre_sp", "mhc_pre_sp"))),
    "mhc_head_sp_bwd": (mhc_head_sp_bwd, (Part("pre_apply_mix", "pre_apply_mix"),
                                          Part("pre_apply_mix_bwd", "pre_apply_mix_bwd"))),
}


def composite_default(parts: dict, layout: tuple, call) -> Optional[dict]:
    """The parts' default configs for their calls (``None`` when no part is tunable)."""
    cfg = {p.name: parts[p.name].default_config(p.call(call)) for p in layout if parts[p.name].tunable}
    return cfg or None


def composite_space(parts: dict, layout: tuple, call) -> list:
    """The default, then part by part the default with that part's config replaced by each point of the
    part's own space (the other parts at their defaults)."""
    d = composite_default(parts, layout, call)
    if d is None:
        return []
    out = [d]
    for p in layout:
        k = parts[p.name]
        if k.config_space is None:
            continue
        for c in k.config_space(p.call(call)):
            cand = dict(d, **{p.name: c})
            if cand not in out:
                out.append(cand)
    return out


def composite_supports(parts: dict, layout: tuple, call) -> Optional[str]:
    """None when every part serves its call, else the first part's reason."""
    for p in layout:
        why = parts[p.name].reason_unsupported(p.call(call))
        if why is not None:
            return why
    return None


def composite_kernel(op: str, backend: str, parts: dict, wrap: Optional[Callable] = None) -> registry.Kernel:
    """The kernel of composite ``op`` on ``backend``, built from ``parts`` (part name -> kernel), not registered;
    ``wrap(fn) -> fn`` changes how the shared function is run (see :func:`register_composites`)."""
    impl, layout = COMPOSITES[op]
    ns = SimpleNamespace(**parts)
    tunable = any(parts[p.name].tunable for p in layout)

    def fn(*args, config=None, **kwargs):
        return impl(ns, *args, config=config, **kwargs)

    fn.__name__ = f"{backend}_{op}"
    return registry.Kernel(
        op, backend, wrap(fn) if wrap is not None else fn,
        supports=lambda call: composite_supports(parts, layout, call),
        config_space=(lambda call: composite_space(parts, layout, call)) if tunable else None,
        default_config=(lambda call: composite_default(parts, layout, call)) if tunable else None,
        parts={p.name: parts[p.name] for p in layout})


def register_composites(backend: str, extra_parts: Optional[dict] = None,
                        overrides: Optional[dict] = None, wrappers: Optional[dict] = None) -> None:
    """Register every composite of :data:`COMPOSITES` for ``backend`` from its registered primitive kernels
    (plus ``extra_parts``, part name -> kernel, for parts that are not ops: ``stream_weight_grad``), except
    the ops in ``overrides`` (op -> dict of :func:`registry.register_kernel` keyword arguments, with ``fn``),
    which are registered as given. ``wrappers`` (op -> ``f(shared_fn) -> fn``) keep the shared composite but
    change how it is run (the reference widens the residual once for all its parts). Composites of
    composites (``post_pre`` uses ``mhc_pre``) take the backend's kernel for the inner one, as registered."""
    overrides = overrides or {}
    extra_parts = extra_parts or {}
    wrappers = wrappers or {}
    for op, (_, layout) in COMPOSITES.items():
        if op in overrides:
            kw = dict(overrides[op])
            registry.register_kernel(op, backend, kw.pop("fn"), **kw)
            continue
        parts = {}
        for p in layout:
            k = extra_parts.get(p.name) or registry.registered(p.op, backend)
            if k is None:
                raise BackendError(f"{backend}: composite {op} needs a kernel for its part {p.name!r}")
            parts[p.name] = k
        registry.add_kernel(composite_kernel(op, backend, parts, wrappers.get(op)))
