"""PyTorch reference implementation of every mHC operator, forward and explicit backward.

This is the production path on CPU and the fallback on any other device. It follows
the contract (reference/README.md) symbol for symbol, on canonical inputs: the residual ``x`` is
``(T, n, C)``, per-token tensors have a leading ``T``; ``fn`` is ``(m, K)`` with
``m = n*(n+2)`` and ``K = n*C``.

Precision: residual-shaped tensors keep their dtype (bf16, fp16, fp32, or fp64 for
gradcheck); every reduction and all mixing math run in the mix dtype (float32, or
float64 alongside a float64 residual), and each full-size result is rounded to the
residual dtype exactly once.

The backward functions are written out (not autograd through the forward): they
save nothing full-size, recompute the Sinkhorn iterations from the logits, and
``norm_fn_bwd`` can add a site's other residual-gradient terms before its single
rounding. All work is vectorised over tokens; the only Python loops run over
Sinkhorn rounds.

Only the primitive operators live here; the composites (``mhc_pre``, ``mhc_head``,
``post_pre``, ``multilayer_recompute`` and their backward) are written once for every
backend in :mod:`mhc_kernels.composite`, from these functions.
"""

from __future__ import annotations

from typing import Optional

import torch

from mhc_kernels.composite import dsigmoid, gate_logits, scale_vector, split_gates
from mhc_kernels.specs import stream_count

Tensor = torch.Tensor


# -- small helpers ----------------------------------------------------------------
def _acc(t: Tensor, mix_dtype: torch.dtype) -> Tensor:
    """``t`` in the accumulation (mix) dtype; no copy when it already is."""
    return t if t.dtype == mix_dtype else t.to(mix_dtype)


def _folded(fn: Tensor, norm_weight: Optional[Tensor]) -> Tensor:
    return fn if norm_weight is None else fn * norm_weight


# -- 2.1 norm_fn --------------------------------------------------------------------
def _norm_fn_acc(x: Tensor, fn: Tensor, norm_weight: Optional[Tensor], norm_eps: float):
    """On ``x`` = x_flat already in the mix dtype ``(T, K)``: -> (mixes, rstd)."""
    K = x.shape[1]
    dots = x @ _folded(fn, norm_weight).T
    # ||x||^2 through vector_norm: one fused reduction, no full-size x*x temporary
    rstd = torch.rsqrt(torch.linalg.vector_norm(x, dim=1).square() / K + norm_eps)
    return dots * rstd[:, None], rstd


def norm_fn_fwd(residual: Tensor, fn: Tensor, norm_weight: Optional[Tensor], norm_eps: float):
    """mixes = (x_flat @ fn_eff^T) * rstd,  rstd = rsqrt(sum(x_flat^2) / K + eps).  -> (mixes, rstd)"""
    T, n, C = residual.shape
    return _norm_fn_acc(_acc(residual.reshape(T, n * C), fn.dtype), fn, norm_weight, norm_eps)


def _norm_fn_bwd_acc(grad_mixes, x, fn, norm_weight, mixes, rstd):
    """On ``x`` = x_flat in the mix dtype ``(T, K)``: -> d_x_flat (mix dtype, (T, K)) and d_fn_eff (m, K).

    dL/dx = rstd * (g @ fn_eff) - (rstd^2 / K) * (g . mixes) * x;  dL/dfn_eff = (g * rstd)^T @ x.
    """
    K = x.shape[1]
    g_r = grad_mixes * rstd[:, None]
    coef = (rstd * rstd / K) * torch.linalg.vecdot(grad_mixes, mixes)
    d_x = g_r @ _folded(fn, norm_weight)
    d_x.addcmul_(coef[:, None], x, value=-1.0)  # in place: on CPU a fresh full-size tensor costs its page faults
    d_fn = g_r.T @ x
    return d_x, d_fn


def norm_fn_bwd(grad_mixes, residual, fn, norm_weight, mixes, rstd, *, apply_w=None, apply_grad=None,
                grad_residual=None):
    """-> (d_residual, d_fn_eff); d_fn_eff is the gradient of fn * norm_weight.

    With ``apply_w (T, n)`` and ``apply_grad (T, C)`` the collapse's term ``apply_w (x) apply_grad``, and with
    ``grad_residual (T, n, C)`` an incoming residual gradient, are added to d_residual in the mix dtype
    before its single rounding (a whole site's pre side in one tensor).
    """
    T, n, C = residual.shape
    x = _acc(residual.reshape(T, n * C), fn.dtype)
    d_x, d_fn = _norm_fn_bwd_acc(grad_mixes, x, fn, norm_weight, mixes, rstd)
    d_x = d_x.view(T, n, C)
    if apply_w is not None:
        d_x.addcmul_(apply_w.unsqueeze(-1), _acc(apply_grad, fn.dtype).unsqueeze(1))  # in place: no temporary
    if grad_residual is not None:
        d_x += grad_residual
    return d_x.to(residual.dtype), d_fn


# -- 2.2 sinkhorn -------------------------------------------------------------------
def sinkhorn_fwd(logits: Tensor, iters: int, eps: float) -> Tensor:
    """P = softmax(L) + eps; P /= colsum + eps; then (iters-1) x (rows, columns)."""
    P = torch.softmax(logits, dim=-1) + eps
    P = P / (P.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        P = P / (P.sum(dim=-1, keepdim=True) + eps)
        P = P / (P.sum(dim=-2, keepdim=True) + eps)
    return P


def sinkhorn_bwd(grad: Tensor, logits: Tensor, iters: int, eps: float) -> Tensor:
    """Exact gradient of the unrolled iterations (contract §9): recompute, then reverse.

    For a normalisation y = p / (sum_d p + eps) along dim d:
    dL/dp = (g - sum_d(g * y)) / (sum_d p + eps).  The softmax: dL/dL = (g - sum(g * s)) * s.
    """
    S = torch.softmax(logits, dim=-1)
    P = S + eps
    steps = []  # (normalised output y, denominator, dim)
    dims = [-2] + [-1, -2] * (iters - 1)
    for d in dims:
        den = P.sum(dim=d, keepdim=True) + eps
        P = P / den
        steps.append((P, den, d))
    g = grad
    for y, den, d in reversed(steps):
        g = (g - (g * y).sum(dim=d, keepdim=True)) / den
    return (g - (g * S).sum(dim=-1, keepdim=True)) * S


# -- 2.2 split_mixes --------------------------------------------------------------------
def split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps):
    """-> (pre_mix (T, n), post_mix (T, n), comb_mix (T, n, n))."""
    n = stream_count(mixes.shape[1])
    pre, post, comb_logits = split_gates(gate_logits(mixes, scale, base, n), n, pre_eps, post_mult)
    return pre, post, sinkhorn_fwd(comb_logits, iters, sinkhorn_eps)


def split_mixes_bwd(grad_pre, grad_post, grad_comb, mixes, scale, base, post_mult, iters, sinkhorn_eps):
    """-> (d_mixes, d_scale (3,), d_base (m,)); the scale/base sums over tokens are deterministic."""
    T, m = mixes.shape
    n = stream_count(m)
    s = scale_vector(scale, n)
    z = torch.addcmul(base, mixes, s)
    dsig = dsigmoid(z[:, :2 * n])
    d_z = torch.empty_like(z)
    d_z[:, :n] = grad_pre * dsig[:, :n]
    d_z[:, n:2 * n] = grad_post * (post_mult * dsig[:, n:])
    d_z[:, 2 * n:] = sinkhorn_bwd(grad_comb, z[:, 2 * n:].reshape(T, n, n), iters, sinkhorn_eps).reshape(T, n * n)
    d_base = d_z.sum(0)
    per_col = (d_z * mixes).sum(0)
    d_scale = torch.stack([per_col[:n].sum(), per_col[n:2 * n].sum(), per_col[2 * n:].sum()])
    return d_z * s, d_scale, d_base


# -- 2.3 pre_apply_mix ----------------------------------------------------------------------
def _apply_acc(x, pre_mix):
    """sum_i pre_mix[:, i] * x[:, i, :] on ``x`` in the mix dtype ``(T, n, C)`` -> ``(T, C)``."""
    return torch.bmm(pre_mix.unsqueeze(1), x).squeeze(1)


def pre_apply_mix_fwd(residual, pre_mix, *, out=None):
    """-> layer_input (T, C) in the residual dtype (written into ``out`` when given)."""
    li = _apply_acc(_acc(residual, pre_mix.dtype), pre_mix)
    if out is None:
        return li.to(residual.dtype)
    return out.copy_(li)


def _pre_apply_mix_bwd_acc(grad, x, pre_mix):
    """On ``x`` in the mix dtype ``(T, n, C)``: -> (d_x (mix dtype), d_pre_mix)."""
    g = _acc(grad, pre_mix.dtype)
    d_x = pre_mix.unsqueeze(-1) * g.unsqueeze(1)
    d_pre = torch.bmm(x, g.unsqueeze(-1)).squeeze(-1)
    return d_x, d_pre


def pre_apply_mix_bwd(grad, residual, pre_mix):
    """-> (d_residual = pre_mix (x) g, d_pre_mix = <g, x_i>)."""
    d_x, d_pre = _pre_apply_mix_bwd_acc(grad, _acc(residual, pre_mix.dtype), pre_mix)
    return d_x.to(residual.dtype), d_pre


def stream_weight_grad(grad, residual):
    """d_w[t, i] = <grad[t], residual[t, i]> (T, n) in the mix dtype: pre_apply_mix_bwd without d_residual."""
    md = torch.float64 if residual.dtype == torch.float64 else torch.float32
    return torch.bmm(_acc(residual, md), _acc(grad, md).unsqueeze(-1)).squeeze(-1)


# -- 2.4 post ----------------------------------------------------------------------------------
def post_fwd(layer_output, residual, post_mix, comb_mix, *, out=None):
    """new[t, i] = post_mix[t, i] * y[t] + sum_j comb_mix[t, j, i] * x[t, j] (written into ``out`` when given)."""
    md = post_mix.dtype
    acc = torch.bmm(comb_mix.transpose(1, 2), _acc(residual, md))
    acc.addcmul_(post_mix.unsqueeze(-1), _acc(layer_output, md).unsqueeze(1))  # in place: no second temporary
    if out is None:
        return acc.to(residual.dtype)
    return out.copy_(acc)


def post_bwd(grad, layer_output, residual, post_mix, comb_mix):
    """-> (d_layer_output, d_residual, d_post_mix, d_comb_mix)."""
    md = post_mix.dtype
    g = _acc(grad, md)
    y = _acc(layer_output, md)
    d_y = torch.bmm(post_mix.unsqueeze(1), g).squeeze(1)
    d_x = torch.bmm(comb_mix, g)
    d_post = torch.bmm(g, y.unsqueeze(-1)).squeeze(-1)
    d_comb = torch.bmm(_acc(residual, md), g.transpose(1, 2))
    return d_y.to(layer_output.dtype), d_x.to(residual.dtype), d_post, d_comb


# -- 2.6 expand ---------------------------------------------------------------------------------------
def expand_fwd(hidden, n):
    # repeat always allocates (expand(...).contiguous() would alias the input when n == 1)
    return hidden.unsqueeze(1).repeat(1, n, 1)


def expand_bwd(grad):
    md = torch.float64 if grad.dtype == torch.float64 else torch.float32
    return grad.sum(dim=1, dtype=md).to(grad.dtype)


# -- FP8 copy of the layer input (contract §15) ---------------------------------------------------------------
def quantize_fp8_fwd(x: Tensor, group: int):
    """-> (codes (T, C) float8_e4m3fn, scales (T, C/group)): per group of ``group`` along C,
    ``a = max(amax |x|, 1e-4)``, scale ``a / 448`` (group 128, float32) or its power of two rounded up (group 32,
    stored as its E8M0 byte: uint8, ``specs.fp8_scale_dtype``), codes ``e4m3(x / scale)`` rounded to nearest even
    and saturated; a group with an inf or NaN gets NaN (0xFF as E8M0)."""
    v = x.float()
    g = v.unflatten(-1, (v.shape[-1] // group, group))
    finite = torch.isfinite(g).all(-1)
    a = torch.where(torch.isfinite(g), g, 0.0).abs().amax(-1).clamp_min(1e-4)
    r = a / 448.0
    if group == 32:
        m, e = torch.frexp(r)
        r = torch.ldexp(torch.ones_like(r), e - (m == 0.5).to(e.dtype))
    q = torch.where(finite.unsqueeze(-1), g / r.unsqueeze(-1), torch.nan)
    codes = q.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)   # nearest even; NaN stays NaN
    scales = torch.where(finite, r, torch.nan)
    return codes.flatten(-2), e8m0_bits(scales) if group == 32 else scales


def e8m0_bits(scales: Tensor) -> Tensor:
    """float32 powers of two (or NaN) -> their E8M0 bytes as uint8: the biased exponent, 0xFF for NaN."""
    return ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
