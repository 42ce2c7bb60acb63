"""The public functional API: one function per mHC operator (DESIGN.md section 2).

Each function validates its inputs, picks a backend (see :mod:`mhc_kernels.registry`)
and runs the matching ``torch.ops.mhc`` custom op, or, in eager mode, the
equivalent fast path (:func:`mhc_kernels.ops.call`). All of them take arbitrary
leading dims (including none and zero tokens), accept non-contiguous inputs, and
are differentiable with respect to every floating tensor argument.

Shapes: ``residual`` ``(..., n, C)``; ``fn`` ``(n*(n+2), n*C)``; ``scale`` ``(3,)``;
``base`` ``(n*(n+2),)``; ``norm_weight`` ``(n*C,)``. The residual is bf16, fp16 or
fp32 (fp64 on the reference backend); parameters and mixes are float32 (float64
alongside a float64 residual).
"""

from __future__ import annotations

from typing import Optional

import torch

from .ops import call

Tensor = torch.Tensor


def _float(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def mhc_pre(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None,
            norm_eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, sinkhorn_iters: int = 20,
            sinkhorn_eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Everything before the sublayer: projection, split, Sinkhorn and collapse (DESIGN 2.5).

    Args:
        residual: ``(..., n, C)`` the n residual streams.
        fn: ``(n*(n+2), n*C)`` float32 projection; rows ``[0, n)`` pre, ``[n, 2n)`` post,
            ``[2n, m)`` the residual mix in row-major ``(i, j)`` order.
        scale: ``(3,)`` float32 gains for the pre, post and residual-mix logits.
        base: ``(n*(n+2),)`` float32 biases.
        norm_weight: optional ``(n*C,)`` float32 RMSNorm gain, folded into ``fn``.
        norm_eps, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps: the constants of DESIGN 2.

    Returns:
        ``(layer_input (..., C), post_mix (..., n), comb_mix (..., n, n))``: the sublayer
        input in the residual's dtype, and the float32 post and residual mixes to pass to
        :func:`mhc_post`.

    In training nothing full-size is saved for backward: only the residual (by
    reference) and ``n*(n+2) + 1`` floats per token; the backward re-reads the residual.
    """
    li, post_mix, comb_mix, _, _ = call("mhc_pre", residual, fn, scale, base, norm_weight, _float(norm_eps),
                                        _float(pre_eps), _float(post_mult), sinkhorn_iters, _float(sinkhorn_eps))
    return li, post_mix, comb_mix


def mhc_post(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor) -> Tensor:
    """Merge the sublayer output back into the streams (DESIGN 2.4).

    ``new_residual[..., i, :] = post_mix[..., i] * layer_output + sum_j comb_mix[..., j, i] * residual[..., j, :]``

    Args:
        layer_output: ``(..., C)`` the sublayer's output, in the residual's dtype.
        residual: ``(..., n, C)`` the streams that went into :func:`mhc_pre`.
        post_mix, comb_mix: ``(..., n)`` and ``(..., n, n)`` from :func:`mhc_pre`.

    Returns:
        ``(..., n, C)`` the new residual, in the residual's dtype.
    """
    return call("post", layer_output, residual, post_mix, comb_mix)


def norm_fn(residual: Tensor, fn: Tensor, *, norm_weight: Optional[Tensor] = None,
            norm_eps: float = 1e-6) -> Tensor:
    """The reordered RMSNorm projection (DESIGN 2.1): ``(x_flat @ fn^T) * rsqrt(mean(x_flat^2) + eps)``.

    ``residual`` ``(..., n, C)``, ``fn`` ``(rows, n*C)`` (usually ``rows = n*(n+2)``) -> float32 ``(..., rows)``.
    """
    mixes, _ = call("norm_fn", residual, fn, norm_weight, _float(norm_eps))
    return mixes


def split_mixes(mixes: Tensor, scale: Tensor, base: Tensor, *, pre_eps: float = 1e-6, post_mult: float = 2.0,
                sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Turn raw mixes into the pre, post and Sinkhorn-projected residual mixes (DESIGN 2.2).

    ``mixes`` ``(..., n*(n+2))`` float32 (n is inferred) -> ``(pre_mix (..., n), post_mix (..., n),
    comb_mix (..., n, n))``.
    """
    return call("split_mixes", mixes, scale, base, _float(pre_eps), _float(post_mult), sinkhorn_iters,
                _float(sinkhorn_eps))


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn-Knopp on ``exp(logits)`` with eps guards, ``iters`` row/column rounds (DESIGN 2.2).

    ``logits`` ``(..., n, n)`` float32 -> ``(..., n, n)``; the last step normalises columns.
    The gradient is the exact gradient of the unrolled iterations.
    """
    return call("sinkhorn", logits, iters, _float(eps))


def pre_apply_mix(residual: Tensor, pre_mix: Tensor) -> Tensor:
    """Collapse the streams (DESIGN 2.3): ``(..., n, C)``, ``(..., n)`` -> ``(..., C)`` in the residual's dtype."""
    return call("pre_apply_mix", residual, pre_mix)


def expand(hidden: Tensor, n: int) -> Tensor:
    """Copy an embedding into ``n`` identical streams (DESIGN 2.6): ``(..., C)`` -> ``(..., n, C)``."""
    return call("expand", hidden, n)


def mhc_head(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None,
             norm_eps: float = 1e-6, pre_eps: float = 1e-6) -> Tensor:
    """Final collapse of the streams before the LM head (DESIGN 2.6).

    ``w = sigmoid(norm_fn(residual, fn) * scale + base) + pre_eps``; returns ``sum_i w_i * residual_i``.
    ``fn`` is ``(n, n*C)``, ``scale`` ``(1,)``, ``base`` ``(n,)``; output ``(..., C)``.
    """
    out, _, _ = call("mhc_head", residual, fn, scale, base, norm_weight, _float(norm_eps), _float(pre_eps))
    return out


def post_pre(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor, fn: Tensor,
             scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-6,
             pre_eps: float = 1e-6, post_mult: float = 2.0, sinkhorn_iters: int = 20,
             sinkhorn_eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``mhc_post`` of one sublayer fused with ``mhc_pre`` of the next (DESIGN 2.7).

    ``fn``/``scale``/``base``/``norm_weight`` are the *next* site's parameters.
    Returns ``(new_residual, layer_input, post_mix, comb_mix)``; the last three are the
    next site's :func:`mhc_pre` outputs, computed from the stored new residual.
    """
    out = call("post_pre", layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight,
               _float(norm_eps), _float(pre_eps), _float(post_mult), sinkhorn_iters, _float(sinkhorn_eps))
    return out[:4]
