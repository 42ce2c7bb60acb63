"""The public functional API: one function per mHC operator of the contract (reference/README.md).

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

from .errors import MHCInputError
from .ops import call
from .specs import FP8_FORMATS

Tensor = torch.Tensor


def _float(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def mhc_pre(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None,
            norm_eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, sinkhorn_iters: int = 20,
            sinkhorn_eps: float = 1e-6, out_norm_weight: Optional[Tensor] = None, out_norm_eps: float = 1e-6,
            return_mixes: bool = False, out_fp8: Optional[str] = None) -> tuple[Tensor, ...]:
    """Everything before the sublayer: projection, split, Sinkhorn and collapse (contract §6).

    Args:
        residual: ``(..., n, C)`` the n residual streams.
        fn: ``(n*(n+2), n*C)`` float32 projection; rows ``[0, n)`` pre, ``[n, 2n)`` post,
            ``[2n, m)`` the residual mix in row-major ``(i, j)`` order.
        scale: ``(3,)`` float32 gains for the pre, post and residual-mix logits.
        base: ``(n*(n+2),)`` float32 biases.
        norm_weight: optional ``(n*C,)`` float32 RMSNorm gain, folded into ``fn``.
        norm_eps, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps: the constants of the contract (§1).
        out_norm_weight: optional ``(C,)`` (float32 or the residual's dtype): the sublayer's own RMSNorm
            (DeepSeek-V4's ``attn_norm``/``ffn_norm``) applied inside the op to the rounded collapse ``u``:
            ``layer_input = round(u * rsqrt(mean(u^2) + out_norm_eps) * w)`` (differentiable in ``w``).
            Without it the layer input is ``u``.
        out_norm_eps: that norm's eps (V4: ``1e-20``; positive).

        return_mixes: also return the raw mixes ``(..., n*(n+2))`` (float32, not differentiable: the
            projection before the gains, from which :func:`mhc_kernels.composite.pre_mix` recomputes the
            pre-mix without touching the residual; activation recompute keeps them).
        out_fp8: ``None``, ``"e4m3_g128"`` or ``"e4m3_g32"``: also return an FP8 copy of the layer input for
            the next FP8 GEMM, ``(codes, scales)`` as :func:`quantize_fp8` computes them from the stored
            (rounded) layer input, appended last. The Triton and TileLang kernels write it in the kernel that
            writes the layer input (no extra launch).

    Returns:
        ``(layer_input (..., C), post_mix (..., n), comb_mix (..., n, n))``: the sublayer
        input in the residual's dtype, and the float32 post and residual mixes to pass to
        :func:`mhc_post`; with ``return_mixes`` the raw mixes fourth.

    In training nothing full-size is saved for backward: only the residual (by
    reference) and ``n*(n+2) + 1`` floats per token; the backward re-reads the residual.

    Example::

        >>> x = torch.randn(8, 4, 64, dtype=torch.bfloat16)            # T=8 tokens, n=4 streams, C=64
        >>> fn, scale, base = torch.randn(24, 256) / 16, torch.full((3,), 0.01), torch.zeros(24)
        >>> layer_input, post_mix, comb_mix = mk.mhc_pre(x, fn, scale, base)
        >>> layer_input.shape, post_mix.shape, comb_mix.shape
        (torch.Size([8, 64]), torch.Size([8, 4]), torch.Size([8, 4, 4]))
    """
    out = call("mhc_pre", residual, fn, scale, base, norm_weight, _weight(out_norm_weight, fn), _float(norm_eps),
               _float(pre_eps), _float(post_mult), sinkhorn_iters, _float(sinkhorn_eps), _float(out_norm_eps),
               _boundary_fp8_group("mhc_pre", out_fp8, residual))
    return out[:4 if return_mixes else 3] + _fp8_outputs(out, out_fp8)


def _full_layer_output(name: str, layer_output: Tensor, partial: bool, group) -> Tensor:
    """The sublayer output the boundary runs on: ``layer_output`` itself, or with ``partial`` the sum of every
    tensor-parallel rank's partial (:func:`mhc_kernels.distributed.reduce_partial`)."""
    if not partial:
        if group is not None:
            raise MHCInputError(f"mhc.{name}: group= is the tensor-parallel group of layer_output_partial=True; "
                                f"it was given with layer_output_partial=False")
        return layer_output
    from .distributed import reduce_partial

    return reduce_partial(name, layer_output, group)


def mhc_post(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor, *,
             layer_output_partial: bool = False, group=None) -> Tensor:
    """Merge the sublayer output back into the streams (contract §5).

    ``new_residual[..., i, :] = post_mix[..., i] * layer_output + sum_j comb_mix[..., j, i] * residual[..., j, :]``

    Args:
        layer_output: ``(..., C)`` the sublayer's output, in the residual's dtype.
        residual: ``(..., n, C)`` the streams that went into :func:`mhc_pre`.
        post_mix, comb_mix: ``(..., n)`` and ``(..., n, n)`` from :func:`mhc_pre`.
        layer_output_partial: ``layer_output`` is this tensor-parallel rank's partial sum (a row-parallel output
            projection's); it is all-reduced (SUM) over ``group`` (default: the world) first, and the residual
            and mixes are the replicated ones. The gradient reaches each rank's partial unchanged.

    Returns:
        ``(..., n, C)`` the new residual, in the residual's dtype.

    Example::

        >>> x, y = torch.randn(8, 4, 64), torch.randn(8, 64)              # residual, sublayer output
        >>> post_mix, comb_mix = torch.full((8, 4), 0.5), torch.eye(4).expand(8, 4, 4)
        >>> mk.mhc_post(y, x, post_mix, comb_mix).shape
        torch.Size([8, 4, 64])
    """
    layer_output = _full_layer_output("post", layer_output, layer_output_partial, group)
    return call("post", layer_output, residual, post_mix, comb_mix)


def norm_fn(residual: Tensor, fn: Tensor, *, norm_weight: Optional[Tensor] = None,
            norm_eps: float = 1e-6) -> Tensor:
    """The reordered RMSNorm projection (contract §2): ``(x_flat @ fn^T) * rsqrt(mean(x_flat^2) + eps)``.

    ``residual`` ``(..., n, C)``, ``fn`` ``(rows, n*C)`` (usually ``rows = n*(n+2)``) -> float32 ``(..., rows)``.

    Example::

        >>> x = torch.randn(2, 8, 4, 64, dtype=torch.bfloat16)         # (batch, seq, n, C)
        >>> mk.norm_fn(x, torch.randn(24, 256) / 16).shape
        torch.Size([2, 8, 24])
    """
    mixes, _ = call("norm_fn", residual, fn, norm_weight, _float(norm_eps))
    return mixes


def split_mixes(mixes: Tensor, scale: Tensor, base: Tensor, *, pre_eps: float = 1e-6, post_mult: float = 2.0,
                sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Turn raw mixes into the pre, post and Sinkhorn-projected residual mixes (contract §3).

    ``mixes`` ``(..., n*(n+2))`` float32 (n is inferred) -> ``(pre_mix (..., n), post_mix (..., n),
    comb_mix (..., n, n))``.

    Example::

        >>> pre, post, comb = mk.split_mixes(torch.randn(8, 24), torch.full((3,), 0.01), torch.zeros(24))
        >>> pre.shape, post.shape, comb.shape
        (torch.Size([8, 4]), torch.Size([8, 4]), torch.Size([8, 4, 4]))
        >>> bool(torch.allclose(comb.sum(-2), torch.ones(8, 4), atol=1e-5))   # columns sum to 1
        True
    """
    return call("split_mixes", mixes, scale, base, _float(pre_eps), _float(post_mult), sinkhorn_iters,
                _float(sinkhorn_eps))


def sinkhorn(logits: Tensor, *, iters: int = 20, eps: float = 1e-6) -> Tensor:
    """Sinkhorn-Knopp on ``exp(logits)`` with eps guards, ``iters`` row/column rounds (contract §3).

    ``logits`` ``(..., n, n)`` float32 -> ``(..., n, n)``; the last step normalises columns.
    The gradient is the exact gradient of the unrolled iterations.

    Example::

        >>> P = mk.sinkhorn(torch.randn(8, 4, 4), iters=20)
        >>> bool(torch.allclose(P.sum(-2), torch.ones(8, 4), atol=1e-5))
        True
    """
    return call("sinkhorn", logits, iters, _float(eps))


def pre_apply_mix(residual: Tensor, pre_mix: Tensor) -> Tensor:
    """Collapse the streams (contract §4): ``(..., n, C)``, ``(..., n)`` -> ``(..., C)`` in the residual's dtype.

    Example::

        >>> x = torch.randn(8, 4, 64, dtype=torch.bfloat16)
        >>> mk.pre_apply_mix(x, torch.full((8, 4), 0.25)).dtype             # the mean of the four streams
        torch.bfloat16
    """
    return call("pre_apply_mix", residual, pre_mix)


def _fp8_group(where: str, fmt, C) -> int:
    """The group of FP8 format ``fmt`` (``"e4m3_g128"`` / ``"e4m3_g32"``), checked against the width ``C``."""
    if fmt not in FP8_FORMATS:
        raise MHCInputError(f"{where}: out_fp8 / fmt must be one of {', '.join(map(repr, FP8_FORMATS))} or None; "
                            f"got {fmt!r}")
    group = FP8_FORMATS[fmt]
    if isinstance(C, int) and C % group:
        alt = " (or 'e4m3_g32')" if group == 128 and C % 32 == 0 else ""
        raise MHCInputError(f"{where}: FP8 format {fmt!r} needs C a multiple of {group} (whole groups of {group} "
                            f"columns); got C={C}: pad the hidden width{alt}")
    return group


def quantize_fp8(x: Tensor, fmt: str = "e4m3_g128") -> tuple[Tensor, Tensor]:
    """The FP8 copy of a layer input (contract §15): e4m3 codes with one scale per group along C.

    Args:
        x: ``(..., C)`` bf16/fp16/fp32 (its stored values are quantised; not differentiated).
        fmt: ``"e4m3_g128"``: groups of 128, float32 scales ``max(amax, 1e-4) / 448`` (Hopper FP8 GEMMs);
            ``"e4m3_g32"``: groups of 32, power-of-two scales ``2^ceil(log2(max(amax, 1e-4) / 448))`` (E8M0,
            Blackwell MX). ``C`` must be a multiple of the group.

    Returns:
        ``(codes (..., C) float8_e4m3fn, scales (..., C / group))``: ``codes = e4m3(x / scale)`` rounded to
        nearest even and saturated to +-448, so ``codes.float() * scale`` (per group) approximates ``x``;
        scales are float32 (``e4m3_g128``) or float8_e8m0fnu (``e4m3_g32``, exact). A group holding an inf or a
        NaN gets a NaN scale and NaN codes (propagated, never a silent finite value).

    Example::

        >>> x = torch.randn(4, 256, dtype=torch.bfloat16)
        >>> codes, scales = mk.quantize_fp8(x)                     # e4m3_g128
        >>> codes.dtype, scales.shape
        (torch.float8_e4m3fn, torch.Size([4, 2]))
        >>> back = (codes.float().unflatten(-1, (2, 128)) * scales.unsqueeze(-1)).flatten(-2)
        >>> bool(((back - x.float()).abs() <= x.float().abs() / 16 + 1e-3).all())
        True
    """
    group = _fp8_group("mhc.quantize_fp8", fmt, x.shape[-1] if isinstance(x, Tensor) and x.dim() else None)
    codes, scales = call("quantize_fp8", x.detach() if isinstance(x, Tensor) else x, group)
    return codes, _fp8_scales(scales, group)


def _fp8_scales(scales: Tensor, group: int) -> Tensor:
    """The public form of FP8 scales as the kernels store them (``specs.fp8_scale_dtype``): float32 for groups of
    128; for groups of 32 the E8M0 bytes viewed as float8_e8m0fnu (free: no launch), or decoded to float32 on a
    torch without that dtype (older than 2.7)."""
    if group != 32:
        return scales
    if hasattr(torch, "float8_e8m0fnu"):
        return scales.view(torch.float8_e8m0fnu)
    exp = scales.to(torch.int32)
    return torch.where(exp == 0xFF, torch.nan, torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp - 127))


def _boundary_fp8_group(name: str, out_fp8, residual) -> int:
    """The ``fp8_group`` argument of a boundary op for ``out_fp8`` (0 without it), checked under ``name``
    against the residual's width."""
    if out_fp8 is None:
        return 0
    C = residual.shape[-1] if isinstance(residual, Tensor) and residual.dim() else None
    return _fp8_group(f"mhc.{name}", out_fp8, C)


def _fp8_outputs(out: tuple, out_fp8) -> tuple:
    """``()`` without ``out_fp8``, else the boundary's ``(fp8_codes, fp8_scales)`` (its last two outputs: written
    by the kernel that writes the layer input, or by ``quantize_fp8`` right after it)."""
    if out_fp8 is None:
        return ()
    return out[-2].view(torch.float8_e4m3fn), _fp8_scales(out[-1], FP8_FORMATS[out_fp8])


def expand(hidden: Tensor, n: int) -> Tensor:
    """Copy an embedding into ``n`` identical streams (contract §7): ``(..., C)`` -> ``(..., n, C)``.

    Example::

        >>> mk.expand(torch.randn(2, 8, 64), 4).shape
        torch.Size([2, 8, 4, 64])
    """
    return call("expand", hidden, n)


def mhc_head(residual: Tensor, fn: Tensor, scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None,
             norm_eps: float = 1e-6, pre_eps: float = 1e-6) -> Tensor:
    """Final collapse of the streams before the LM head (contract §7).

    ``w = sigmoid(norm_fn(residual, fn) * scale + base) + pre_eps``; returns ``sum_i w_i * residual_i``.
    ``fn`` is ``(n, n*C)``, ``scale`` ``(1,)``, ``base`` ``(n,)``; output ``(..., C)``.

    Example::

        >>> x = torch.randn(8, 4, 64, dtype=torch.bfloat16)
        >>> mk.mhc_head(x, torch.randn(4, 256) / 16, torch.full((1,), 0.01), torch.zeros(4)).shape
        torch.Size([8, 64])
    """
    out, _, _ = call("mhc_head", residual, fn, scale, base, norm_weight, _float(norm_eps), _float(pre_eps))
    return out


def post_pre(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor, fn: Tensor,
             scale: Tensor, base: Tensor, *, norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-6,
             pre_eps: float = 1e-6, post_mult: float = 2.0, sinkhorn_iters: int = 20,
             sinkhorn_eps: float = 1e-6, out_norm_weight: Optional[Tensor] = None,
             out_norm_eps: float = 1e-6, layer_output_partial: bool = False, group=None,
             out_fp8: Optional[str] = None) -> tuple[Tensor, ...]:
    """``mhc_post`` of one sublayer fused with ``mhc_pre`` of the next (contract §8).

    ``fn``/``scale``/``base``/``norm_weight``/``out_norm_weight`` are the *next* site's parameters
    (``out_norm_weight``: the next sublayer's RMSNorm, as in :func:`mhc_pre`). ``layer_output_partial`` /
    ``group``: tensor-parallel serving, as in :func:`mhc_post` (the all-reduce runs first). ``out_fp8``: also
    the FP8 copy of the layer input, as in :func:`mhc_pre`.
    Returns ``(new_residual, layer_input, post_mix, comb_mix)``; the last three are the
    next site's :func:`mhc_pre` outputs, computed from the stored new residual.

    Example::

        >>> x = torch.randn(8, 4, 64, dtype=torch.bfloat16)
        >>> fn, scale, base = torch.randn(24, 256) / 16, torch.full((3,), 0.01), torch.zeros(24)
        >>> layer_input, post_mix, comb_mix = mk.mhc_pre(x, fn, scale, base)        # site l
        >>> y = layer_input                                                       # the sublayer (identity here)
        >>> x, layer_input, post_mix, comb_mix = mk.post_pre(y, x, post_mix, comb_mix, fn, scale, base)  # l -> l+1
        >>> x.shape, layer_input.shape
        (torch.Size([8, 4, 64]), torch.Size([8, 64]))
    """
    layer_output = _full_layer_output("post_pre", layer_output, layer_output_partial, group)
    out = call("post_pre", layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight,
               _weight(out_norm_weight, fn), _float(norm_eps), _float(pre_eps), _float(post_mult), sinkhorn_iters,
               _float(sinkhorn_eps), _float(out_norm_eps), _boundary_fp8_group("post_pre", out_fp8, residual))
    return out[:4] + _fp8_outputs(out, out_fp8)


def multilayer_recompute(residual: Tensor, layer_outputs: Tensor, pre_mix: Tensor, post_mix: Tensor,
                         comb_mix: Tensor) -> tuple[Tensor, Tensor]:
    """Rebuild L consecutive sites' residuals and layer inputs from the first residual (contract §8).

    Args:
        residual: ``(..., n, C)`` x_0, the first site's input residual.
        layer_outputs: ``(L, ..., C)`` each site's sublayer output (residual dtype).
        pre_mix, post_mix: ``(L, ..., n)`` float32; comb_mix: ``(L, ..., n, n)`` float32.

    Returns:
        ``(residuals (L, ..., n, C), layer_inputs (L, ..., C))``: ``residuals[l] = x_l`` (x_0
        copied) with ``x_{l+1} = post(layer_outputs[l], x_l, post_mix[l], comb_mix[l])``, and
        ``layer_inputs[l] = pre_apply_mix(x_l, pre_mix[l])``; every x_l is rounded to the
        residual dtype before it is read again. The last site's output and post/comb mixes are
        not read. Forward-only: call it under ``torch.no_grad()``.

    Example::

        >>> L, x0 = 3, torch.randn(8, 4, 64, dtype=torch.bfloat16)
        >>> ys = torch.randn(L, 8, 64, dtype=torch.bfloat16)
        >>> pre, post = torch.full((L, 8, 4), 0.25), torch.ones(L, 8, 4)
        >>> comb = torch.eye(4).expand(L, 8, 4, 4)
        >>> with torch.no_grad():
        ...     residuals, layer_inputs = mk.multilayer_recompute(x0, ys, pre, post, comb)
        >>> residuals.shape, layer_inputs.shape
        (torch.Size([3, 8, 4, 64]), torch.Size([3, 8, 64]))
    """
    return call("multilayer_recompute", residual, layer_outputs, pre_mix, post_mix, comb_mix)


# -- single-pass mHC (DeepSeek-V4.1; contract §14) ---------------------------------------------------------
V41 = dict(norm_eps=1e-20, out_norm_eps=1e-20, pre_eps=1e-6, sinkhorn_eps=1e-6, post_mult=2.0, sinkhorn_iters=20)
"""DeepSeek-V4.1's constants, as keywords: ``mk.mhc_pre_sp(..., **mk.V41)``. The projection RMS and the
sublayer norms use ``rms_norm_eps = 1e-20``; the pre and Sinkhorn eps are ``hc_eps = 1e-6``."""


def _weight(w: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    """An out-norm weight given in the residual's dtype (as models store it) as the mix dtype: exact."""
    if w is None or w.dtype == like.dtype:
        return w
    return w.to(like.dtype) if w.is_floating_point() else w


def mhc_pre_sp(residual: Tensor, prev_pre: Optional[Tensor], fn: Tensor, scale: Tensor, base: Tensor, *,
               norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-6, pre_eps: float = 1e-6,
               post_mult: float = 2.0, sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6,
               out_norm_weight: Optional[Tensor] = None, out_norm_eps: float = 1e-6,
               out_fp8: Optional[str] = None) -> tuple[Tensor, ...]:
    """Single-pass pre (contract §14): the sublayer input is the residual collapsed with the *previous*
    site's pre; this site's coefficients come from the same residual.

    Args:
        residual: ``(..., n, C)``.
        prev_pre: ``(..., n)`` float32, the previous site's ``pre`` (differentiable), or ``None`` at the first
            site: the one-hot on stream 0, so the layer input is ``residual[..., 0, :]`` bit for bit.
        fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps: this site's
            coefficient head, as :func:`mhc_pre`.
        out_norm_weight: optional ``(C,)`` (float32 or the residual's dtype): the sublayer's RMSNorm, applied to
            the rounded collapse ``u``: ``round(u * rsqrt(mean(u^2) + out_norm_eps) * w)``.
        out_fp8: also the FP8 copy of the layer input, ``(codes, scales)`` appended last, as in :func:`mhc_pre`.

    Returns:
        ``(layer_input (..., C), pre (..., n), post_mix (..., n), comb_mix (..., n, n))``: ``pre``, ``post_mix``,
        ``comb_mix`` are exactly :func:`mhc_pre`'s from the same residual (``pre`` includes ``pre_eps``); pass
        ``pre`` to the next site as its ``prev_pre`` and ``post_mix``/``comb_mix`` to :func:`mhc_post`.

    Example::

        >>> x = torch.randn(8, 4, 64, dtype=torch.bfloat16)
        >>> fn, scale, base = torch.randn(24, 256) / 16, torch.full((3,), 0.01), torch.zeros(24)
        >>> h, pre, post_mix, comb_mix = mk.mhc_pre_sp(x, None, fn, scale, base, **mk.V41)   # first site
        >>> torch.equal(h, x[:, 0])
        True
        >>> h2, pre2, _, _ = mk.mhc_pre_sp(x, pre, fn, scale, base, **mk.V41)                 # the next site
    """
    out = call("mhc_pre_sp", residual, prev_pre, fn, scale, base, norm_weight, _weight(out_norm_weight, fn),
               _float(norm_eps), _float(pre_eps), _float(post_mult), sinkhorn_iters, _float(sinkhorn_eps),
               _float(out_norm_eps), _boundary_fp8_group("mhc_pre_sp", out_fp8, residual))
    return out[:4] + _fp8_outputs(out, out_fp8)


def post_pre_sp(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor,
                prev_pre: Optional[Tensor], fn: Tensor, scale: Tensor, base: Tensor, *,
                norm_weight: Optional[Tensor] = None, norm_eps: float = 1e-6, pre_eps: float = 1e-6,
                post_mult: float = 2.0, sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6,
                out_norm_weight: Optional[Tensor] = None, out_norm_eps: float = 1e-6,
                layer_output_partial: bool = False, group=None, out_fp8: Optional[str] = None) -> tuple[Tensor, ...]:
    """The single-pass boundary (contract §14): :func:`mhc_post` of site s-1, then :func:`mhc_pre_sp` of site s
    on the stored new residual. ``post_mix``/``comb_mix`` are site s-1's, ``prev_pre`` is site s-1's pre,
    ``fn``/``scale``/``base``/``norm_weight``/``out_norm_weight`` are site s's.

    Returns ``(new_residual, layer_input, pre, post_mix, comb_mix)`` (the last three: site s's). Its floor is
    ``(2n+2)*C`` elements per token: the residual and the layer output read once, the new residual and the
    layer input written once. ``layer_output_partial`` / ``group``: tensor-parallel serving, as in
    :func:`mhc_post` (the all-reduce runs first). ``out_fp8``: also the FP8 copy of the layer input, as in
    :func:`mhc_pre`.

    Example::

        >>> x, y = torch.randn(8, 4, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16)
        >>> fn, scale, base = torch.randn(24, 256) / 16, torch.full((3,), 0.01), torch.zeros(24)
        >>> h, pre, post_mix, comb_mix = mk.mhc_pre_sp(x, None, fn, scale, base)
        >>> x, h, pre, post_mix, comb_mix = mk.post_pre_sp(y, x, post_mix, comb_mix, pre, fn, scale, base)
        >>> x.shape, h.shape, pre.shape
        (torch.Size([8, 4, 64]), torch.Size([8, 64]), torch.Size([8, 4]))
    """
    layer_output = _full_layer_output("post_pre_sp", layer_output, layer_output_partial, group)
    out = call("post_pre_sp", layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
               _weight(out_norm_weight, fn), _float(norm_eps), _float(pre_eps), _float(post_mult), sinkhorn_iters,
               _float(sinkhorn_eps), _float(out_norm_eps), _boundary_fp8_group("post_pre_sp", out_fp8, residual))
    return out[:5] + _fp8_outputs(out, out_fp8)


def mhc_head_sp(residual: Tensor, pre: Optional[Tensor] = None, *, out_norm_weight: Optional[Tensor] = None,
                out_norm_eps: float = 1e-6, mean: bool = False) -> Tensor:
    """Single-pass head (contract §14): the final residual collapsed with the last site's ``pre`` (no learned
    head parameters), optionally followed by the model's final RMSNorm (``out_norm_weight``).

    ``mean=True`` (with ``pre=None``) is GLM-5.3's unweighted mean over the streams: the collapse with the
    constant pre ``1/n``. ``residual (..., n, C)``, ``pre (..., n)`` float32 -> ``(..., C)``.

    Example::

        >>> x, pre = torch.randn(8, 4, 64), torch.full((8, 4), 0.25)
        >>> mk.mhc_head_sp(x, pre).shape
        torch.Size([8, 64])
        >>> torch.allclose(mk.mhc_head_sp(x, mean=True), x.mean(-2))
        True
    """
    if mean:
        if pre is not None:
            raise MHCInputError("mhc.mhc_head_sp: give either pre or mean=True, not both")
        md = torch.float64 if residual.dtype == torch.float64 else torch.float32
        # new_full: a DTensor residual gives a DTensor pre (torch.full would give a plain tensor)
        pre = residual.new_full(residual.shape[:-1], 1.0 / residual.shape[-2], dtype=md)
    elif pre is None:
        raise MHCInputError("mhc.mhc_head_sp: pre is required (the last site's pre), or mean=True for the "
                            "unweighted mean over the streams")
    out, _ = call("mhc_head_sp", residual, pre, _weight(out_norm_weight, pre), _float(out_norm_eps))
    return out
