"""A plain PyTorch transcription of the contract (reference/README.md), differentiated by autograd.

This is what a user would write without this library: one line per formula,
arbitrary leading dims, backward by autograd through the forward. It has two jobs:

* the **baseline** the benchmarks compare against (eager, and under ``torch.compile``);
* the **gradient oracle** for tests: run on float64 inputs, its autograd gradients
  are the exact derivatives of the function the NumPy oracle computes (the tests
  check its forward against the oracle too).

It is not used by any backend. Mixing math runs in ``fn``/``mixes`` dtype (float32,
or float64 in oracle mode); residual-shaped outputs keep the residual's dtype.
"""

from __future__ import annotations

import torch


def norm_fn(residual, fn, norm_weight=None, norm_eps=1e-6):
    x = residual.flatten(-2).to(fn.dtype)
    w = fn if norm_weight is None else fn * norm_weight
    return (x @ w.T) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm_eps)


def sinkhorn(logits, iters=20, eps=1e-6):
    P = torch.softmax(logits, dim=-1) + eps
    P = P / (P.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        P = P / (P.sum(-1, keepdim=True) + eps)
        P = P / (P.sum(-2, keepdim=True) + eps)
    return P


def split_mixes(mixes, scale, base, pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6):
    m = mixes.shape[-1]
    n = round((m + 1) ** 0.5) - 1
    s = torch.cat([scale[0].expand(n), scale[1].expand(n), scale[2].expand(n * n)])
    z = mixes * s + base
    pre = torch.sigmoid(z[..., :n]) + pre_eps
    post = torch.sigmoid(z[..., n:2 * n]) * post_mult
    comb = sinkhorn(z[..., 2 * n:].unflatten(-1, (n, n)), sinkhorn_iters, sinkhorn_eps)
    return pre, post, comb


def pre_apply_mix(residual, pre_mix):
    return (pre_mix.unsqueeze(-1) * residual.to(pre_mix.dtype)).sum(-2).to(residual.dtype)


def post(layer_output, residual, post_mix, comb_mix):
    md = post_mix.dtype
    out = post_mix.unsqueeze(-1) * layer_output.to(md).unsqueeze(-2) + torch.einsum(
        "...ji,...jc->...ic", comb_mix, residual.to(md))
    return out.to(residual.dtype)


def mhc_pre(residual, fn, scale, base, norm_weight=None, norm_eps=1e-6, pre_eps=1e-6, post_mult=2.0,
            sinkhorn_iters=20, sinkhorn_eps=1e-6, out_norm_weight=None, out_norm_eps=1e-6):
    mixes = norm_fn(residual, fn, norm_weight, norm_eps)
    pre, post_mix, comb = split_mixes(mixes, scale, base, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps)
    return collapse_norm(residual, pre, out_norm_weight, out_norm_eps), post_mix, comb


def expand(hidden, n):
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], n, hidden.shape[-1]).contiguous()


def mhc_head(residual, fn, scale, base, norm_weight=None, norm_eps=1e-6, pre_eps=1e-6):
    w = torch.sigmoid(norm_fn(residual, fn, norm_weight, norm_eps) * scale + base) + pre_eps
    return pre_apply_mix(residual, w)


def post_pre(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight=None, norm_eps=1e-6,
             pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6, store=None, out_norm_weight=None,
             out_norm_eps=1e-6):
    """``store`` (optional) models storing the new residual (its value and its gradient) in a lower precision."""
    new_residual = post(layer_output, residual, post_mix, comb_mix)
    if store is not None:
        new_residual = store(new_residual)
    return (new_residual,) + mhc_pre(new_residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult,
                                     sinkhorn_iters, sinkhorn_eps, out_norm_weight, out_norm_eps)


def mhc_site(residual, sublayer, fn, scale, base, norm_weight=None, **consts):
    """One mHC site: mhc_pre -> sublayer -> post (the unit the benchmarks time)."""
    layer_input, post_mix, comb_mix = mhc_pre(residual, fn, scale, base, norm_weight, **consts)
    return post(sublayer(layer_input), residual, post_mix, comb_mix)


def multilayer_recompute(residual, layer_outputs, pre_mix, post_mix, comb_mix, stored=None):
    """L sites of pre_apply_mix/post from x_0: -> (residuals (L, ..., n, C), layer_inputs (L, ..., C)).

    ``stored`` (optional): read ``stored[l]`` as layer l's residual (as in the oracle)."""
    x = residual
    residuals, inputs = [], []
    for layer in range(layer_outputs.shape[0]):
        residuals.append(x)
        read = x if stored is None or layer == 0 else stored[layer]
        inputs.append(pre_apply_mix(read, pre_mix[layer]))
        x = post(layer_outputs[layer], read, post_mix[layer], comb_mix[layer])
    return torch.stack(residuals), torch.stack(inputs)


# -- single-pass mHC -------------------------------------------------------------------------------------------
def collapse_norm(residual, pre, out_norm_weight=None, out_norm_eps=1e-6):
    """The stored collapse u (stream 0 when ``pre`` is None), then its RMSNorm from the stored u."""
    u = residual[..., 0, :] if pre is None else pre_apply_mix(residual, pre)
    if out_norm_weight is None:
        return u if pre is not None else u.clone()
    uf = u.to(out_norm_weight.dtype)
    return (uf * torch.rsqrt(uf.pow(2).mean(-1, keepdim=True) + out_norm_eps) * out_norm_weight).to(residual.dtype)


def mhc_pre_sp(residual, prev_pre, fn, scale, base, norm_weight=None, out_norm_weight=None, norm_eps=1e-6,
               pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6, out_norm_eps=1e-6):
    mixes = norm_fn(residual, fn, norm_weight, norm_eps)
    pre, post_mix, comb = split_mixes(mixes, scale, base, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps)
    return collapse_norm(residual, prev_pre, out_norm_weight, out_norm_eps), pre, post_mix, comb


def post_pre_sp(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight=None,
                out_norm_weight=None, store=None, **consts):
    new_residual = post(layer_output, residual, post_mix, comb_mix)
    if store is not None:
        new_residual = store(new_residual)
    return (new_residual,) + mhc_pre_sp(new_residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight,
                                        **consts)


def mhc_head_sp(residual, pre, out_norm_weight=None, out_norm_eps=1e-6):
    return collapse_norm(residual, pre, out_norm_weight, out_norm_eps)


# -- FP8 copy of the layer input (contract §15) ---------------------------------------------------------------
def quantize_fp8(x, group=128):
    """Per group of ``group`` along C: scale from the amax (float32 amax/448, or its power of two at 32), codes
    ``e4m3(x / scale)`` (torch's cast: nearest, saturating); NaN scale and codes for a group with inf/NaN."""
    v = x.float()
    g = v.unflatten(-1, (v.shape[-1] // group, group))
    finite = torch.isfinite(g).all(-1)
    a = g.abs().amax(-1).clamp_min(1e-4)
    scale = a / 448.0
    if group == 32:
        m, e = torch.frexp(scale)
        scale = torch.ldexp(torch.ones_like(scale), e - (m == 0.5).int())
    scale = torch.where(finite, scale, torch.nan)
    codes = (g / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes.flatten(-2), scale
