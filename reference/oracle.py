"""The float64 NumPy oracle: the ground truth for every backend's forward.

A direct transcription of the contract (reference/README.md) in NumPy float64 with no attention
to speed. Inputs may be NumPy arrays or torch tensors (any dtype; they are read as
float64), with arbitrary leading dims. Outputs are float64 arrays.

Tests round low-precision inputs first and feed the *rounded* values here, so the
oracle answers "what is the exact result for these stored inputs"; the only error a
backend may add is its accumulation error and the final rounding of its outputs.
"""

from __future__ import annotations

import numpy as np


def f64(a):
    """float64 NumPy copy of an array or tensor (bf16 tensors included)."""
    if a is None:
        return None
    if hasattr(a, "detach"):
        import torch

        return a.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _folded(fn, norm_weight):
    fn = f64(fn)
    return fn if norm_weight is None else fn * f64(norm_weight)[None, :]


def rstd(residual, norm_eps=1e-6):
    """rsqrt(sum(x_flat^2) / K + eps), shape (...)."""
    x = f64(residual)
    xf = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    return 1.0 / np.sqrt((xf * xf).sum(-1) / xf.shape[-1] + norm_eps)


def norm_fn(residual, fn, norm_weight=None, norm_eps=1e-6):
    """contract §2: mixes[..., k] = (x_flat . fn_eff[k]) * rstd.  (..., m) or (..., rows of fn)."""
    x = f64(residual)
    xf = x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))
    return (xf @ _folded(fn, norm_weight).T) * rstd(x, norm_eps)[..., None]


def sinkhorn(logits, iters=20, eps=1e-6):
    """contract §3: softmax rows, +eps, normalise columns; then (iters-1) x (rows, columns)."""
    L = f64(logits)
    E = np.exp(L - L.max(axis=-1, keepdims=True))
    P = E / E.sum(axis=-1, keepdims=True) + eps
    P = P / (P.sum(axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        P = P / (P.sum(axis=-1, keepdims=True) + eps)
        P = P / (P.sum(axis=-2, keepdims=True) + eps)
    return P


def split_mixes(mixes, scale, base, pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6):
    """contract §3: -> (pre_mix (..., n), post_mix (..., n), comb_mix (..., n, n))."""
    mx = f64(mixes)
    m = mx.shape[-1]
    n = int(round(np.sqrt(m + 1))) - 1
    sc = f64(scale)
    s = np.concatenate([np.full(n, sc[0]), np.full(n, sc[1]), np.full(n * n, sc[2])])
    z = mx * s + f64(base)
    pre = _sigmoid(z[..., :n]) + pre_eps
    post = _sigmoid(z[..., n:2 * n]) * post_mult
    comb = sinkhorn(z[..., 2 * n:].reshape(z.shape[:-1] + (n, n)), sinkhorn_iters, sinkhorn_eps)
    return pre, post, comb


def pre_apply_mix(residual, pre_mix):
    """contract §4: layer_input[..., c] = sum_i pre_mix[..., i] * x[..., i, c]."""
    return np.einsum("...i,...ic->...c", f64(pre_mix), f64(residual))


def post(layer_output, residual, post_mix, comb_mix):
    """contract §5: out[..., i, c] = post_mix[..., i] * y[..., c] + sum_j comb_mix[..., j, i] * x[..., j, c]."""
    y = f64(layer_output)
    return f64(post_mix)[..., :, None] * y[..., None, :] + np.einsum("...ji,...jc->...ic", f64(comb_mix),
                                                                     f64(residual))


def mhc_pre(residual, fn, scale, base, norm_weight=None, norm_eps=1e-6, pre_eps=1e-6, post_mult=2.0,
            sinkhorn_iters=20, sinkhorn_eps=1e-6, out_norm_weight=None, out_norm_eps=1e-6):
    """contract §6: -> (layer_input, post_mix, comb_mix); with ``out_norm_weight`` the collapse is then
    RMS-normalised (the sublayer's norm, §14's formula with this site's own pre)."""
    mixes = norm_fn(residual, fn, norm_weight, norm_eps)
    pre, post_mix, comb = split_mixes(mixes, scale, base, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps)
    return collapse_norm(residual, pre, out_norm_weight, out_norm_eps), post_mix, comb


def expand(hidden, n):
    """contract §7: (..., C) -> (..., n, C), each stream a copy."""
    h = f64(hidden)
    return np.repeat(h[..., None, :], n, axis=-2)


def mhc_head(residual, fn, scale, base, norm_weight=None, norm_eps=1e-6, pre_eps=1e-6):
    """contract §7: w = sigmoid(norm_fn(x) * scale + base) + pre_eps; out = sum_i w_i x_i."""
    w = _sigmoid(norm_fn(residual, fn, norm_weight, norm_eps) * f64(scale)[0] + f64(base)) + pre_eps
    return pre_apply_mix(residual, w)


def post_pre(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight=None, norm_eps=1e-6,
             pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6, store=None, out_norm_weight=None,
             out_norm_eps=1e-6):
    """contract §8: -> (new_residual, layer_input, post_mix, comb_mix) of the next sublayer.

    ``store`` (optional) maps the float64 new residual to the values the backend
    stores (e.g. rounding to bf16); the next pre reads the stored residual.
    """
    new_residual = post(layer_output, residual, post_mix, comb_mix)
    stored = new_residual if store is None else f64(store(new_residual))
    return (new_residual,) + mhc_pre(stored, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult,
                                     sinkhorn_iters, sinkhorn_eps, out_norm_weight, out_norm_eps)


def multilayer_recompute(residual, layer_outputs, pre_mix, post_mix, comb_mix, stored=None):
    """contract §8: -> (residuals (L, ..., n, C), layer_inputs (L, ..., C)).

    ``residuals[l] = x_l`` with ``x_{l+1} = post(layer_outputs[l], x_l, post_mix[l], comb_mix[l])``;
    ``layer_inputs[l] = pre_apply_mix(x_l, pre_mix[l])``. ``stored`` (optional, like ``residuals``)
    holds the residuals as a backend stored them: each layer then reads ``stored[l]`` instead of
    the exact x_l, so every layer is the exact function of what the backend's previous layer
    produced (and checked on its own).
    """
    ys, pre, post_m, comb = f64(layer_outputs), f64(pre_mix), f64(post_mix), f64(comb_mix)
    x = f64(residual)
    residuals, inputs = [], []
    for layer in range(ys.shape[0]):
        residuals.append(x)
        read = x if stored is None or layer == 0 else f64(stored[layer])
        inputs.append(pre_apply_mix(read, pre[layer]))
        x = post(ys[layer], read, post_m[layer], comb[layer])
    return np.stack(residuals), np.stack(inputs)


# -- single-pass mHC (contract §14) -------------------------------------------------------------------------
def collapse_norm(residual, pre, out_norm_weight=None, out_norm_eps=1e-6):
    """u = sum_i pre_i x_i (stream 0 when ``pre`` is None), then u * rsqrt(mean(u^2) + eps) * w with a weight."""
    x = f64(residual)
    u = x[..., 0, :] if pre is None else pre_apply_mix(x, pre)
    if out_norm_weight is None:
        return u
    return u / np.sqrt((u * u).mean(-1, keepdims=True) + out_norm_eps) * f64(out_norm_weight)


def mhc_pre_sp(residual, prev_pre, fn, scale, base, norm_weight=None, out_norm_weight=None, norm_eps=1e-6,
               pre_eps=1e-6, post_mult=2.0, sinkhorn_iters=20, sinkhorn_eps=1e-6, out_norm_eps=1e-6):
    """contract §14: -> (layer_input, pre, post_mix, comb_mix); layer_input collapses with ``prev_pre``."""
    mixes = norm_fn(residual, fn, norm_weight, norm_eps)
    pre, post_mix, comb = split_mixes(mixes, scale, base, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps)
    return collapse_norm(residual, prev_pre, out_norm_weight, out_norm_eps), pre, post_mix, comb


def post_pre_sp(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight=None,
                out_norm_weight=None, store=None, **consts):
    """contract §14: -> (new_residual, layer_input, pre, post_mix, comb_mix); ``store`` as for post_pre."""
    new_residual = post(layer_output, residual, post_mix, comb_mix)
    stored = new_residual if store is None else f64(store(new_residual))
    return (new_residual,) + mhc_pre_sp(stored, prev_pre, fn, scale, base, norm_weight, out_norm_weight, **consts)


def mhc_head_sp(residual, pre, out_norm_weight=None, out_norm_eps=1e-6):
    """contract §14: the final collapse with the last site's pre, optionally normalised."""
    return collapse_norm(residual, pre, out_norm_weight, out_norm_eps)


# -- FP8 copy of the layer input (contract §15) ---------------------------------------------------------------
E4M3_MAX = 448.0       # largest finite float8_e4m3fn
FP8_AMAX_FLOOR = 1e-4  # a group's amax is taken as at least this (an all-zero group gets a finite scale)


def e4m3_round(q):
    """The float8_e4m3fn value nearest to each finite ``q`` (ties to even), saturated to +-448: on the grid
    of step 2^(e-3) for |q| in [2^e, 2^(e+1)), e >= -6, and 2^-9 below 2^-6 (the subnormals)."""
    q = np.asarray(q, dtype=np.float64)
    a = np.minimum(np.abs(q), E4M3_MAX)
    _, e = np.frexp(a)                        # a = m * 2^e with m in [0.5, 1)
    step = np.ldexp(1.0, np.maximum(e - 1, -6) - 3)
    r = np.minimum(np.round(a / step) * step, E4M3_MAX)   # np.round: half to even
    return np.copysign(r, q)


def quantize_fp8(x, group=128):
    """contract §15: -> (codes (..., C), scales (..., C/group)) as float64 values.

    ``v`` = x's values in float32. Per group of ``group`` elements along C: ``a = max(amax |v|, 1e-4)``;
    group 128: ``scale = fl32(a / 448)``; group 32: ``scale = 2^ceil(log2(fl32(a / 448)))`` (E8M0);
    ``codes = e4m3(fl32(v / scale))`` (nearest, ties to even, saturated). A group with an inf or NaN gets a NaN
    scale and NaN codes."""
    v = np.asarray(f64(x), dtype=np.float32).astype(np.float64)
    C = v.shape[-1]
    g = v.reshape(v.shape[:-1] + (C // group, group))
    finite = np.isfinite(g).all(-1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(g), g, 0.0)).max(-1), 0.0)
    a = np.maximum(amax, np.float64(np.float32(FP8_AMAX_FLOOR)))
    r = (a.astype(np.float32) / np.float32(E4M3_MAX)).astype(np.float64)
    if group == 32:
        m, e = np.frexp(r)
        scale = np.ldexp(1.0, np.where(m == 0.5, e - 1, e))
    else:
        scale = r
    q = (g.astype(np.float32) / scale[..., None].astype(np.float32)).astype(np.float64)
    codes = e4m3_round(np.where(finite[..., None], q, 0.0))
    codes = np.where(finite[..., None], codes, np.nan).reshape(v.shape)
    return codes, np.where(finite, scale, np.nan)
