"""Triton compositions for the fused mHC paths, and the stream-weight gradient kernel they need.

The composite ops are built from the single-purpose kernels so that every
full-size tensor is read or written as few times as the math allows:

``mhc_pre`` (inference and training forward)
    ``norm_fn`` (pass 1 over the residual: projections + sum of squares) ->
    ``split_mixes`` (per-token, O(n^2) floats) -> ``pre_apply_mix`` (pass 2).
    The residual is read twice; the only full-size write is ``layer_input`` (T, C).
``mhc_pre_bwd``
    ``stream_weight_grad`` (pass 1: d_pre[t, i] = <g_li[t], x[t, i]>) ->
    ``split_mixes_bwd`` (per token) -> ``norm_fn_bwd`` with the apply-mix term and
    the incoming residual gradient folded in (pass 2). The three residual-gradient
    terms (incoming ``grad_residual``, pre_apply_mix's and norm_fn's) are summed in
    registers and written once: no three full-size tensors and no adds. In a model
    built from ``post_pre`` (post of one sublayer fused with pre of the next),
    ``grad_residual`` is the gradient of the new residual, so one site's backward
    writes one residual-gradient tensor and ``post_bwd`` reads it once.
``mhc_head`` / ``mhc_head_bwd``
    the same with ``rows = n`` projections and sigmoid weights.
``post_pre``
    ``post`` then ``mhc_pre`` on the new residual (three residual passes: one write,
    two reads).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, mix, norm_fn, sinkhorn

Tensor = torch.Tensor


# -- stream-weight gradient: d_w[t, i] = sum_c g[t, c] * x[t, i, c] ---------------------------
@triton.jit
def stream_weight_grad_kernel(g_ptr, x_ptr, dw_ptr, T, C,
                              N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    """g (T, C) and x (T, N, C) in the residual dtype -> d_w (T, N) float32.

    Each program owns BLOCK_T tokens and loops over all of C, so the per-token sums are
    deterministic (fixed order, no atomics). Traffic: reads x once and g once
    (T*(N+1)*C elements), writes T*N floats.
    """
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    i_ok = i < N
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        g = tl.load(g_ptr + t[:, None] * C + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        x_offs = (t[:, None, None] * N + i[None, :, None]) * C + c[None, None, :]
        x_mask = t_ok[:, None, None] & i_ok[None, :, None] & c_ok[None, None, :]
        x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        acc += tl.sum(x.to(tl.float32) * g.to(tl.float32)[:, None, :], axis=2)
    tl.store(dw_ptr + t[:, None] * N + i[None, :], acc, mask=t_ok[:, None] & i_ok[None, :])


def stream_weight_grad_default_config(T: int, n: int, C: int) -> dict:
    block_n = common.next_pow2(n)
    block_c = min(common.next_pow2(C), max(16, 1024 // block_n))
    return {"BLOCK_T": 1, "BLOCK_C": block_c, "num_warps": 4, "num_stages": 2}


def stream_weight_grad(grad: Tensor, residual: Tensor, *, config=None) -> Tensor:
    """d_w[t, i] = <grad[t], residual[t, i]>: grad (T, C), residual (T, n, C) -> (T, n) float32."""
    T, n, C = residual.shape
    out = torch.empty((T, n), dtype=torch.float32, device=residual.device)
    if T == 0:
        return out
    cfg = common.resolve_config("stream_weight_grad", residual, n, C, T, config,
                                lambda: stream_weight_grad_default_config(T, n, C))
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    stream_weight_grad_kernel[grid](grad, residual, out, T, C, N=n, BLOCK_N=common.next_pow2(n),
                                    BLOCK_T=cfg["BLOCK_T"], BLOCK_C=cfg["BLOCK_C"],
                                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def aot_specs(n: int, C: int, dtype: torch.dtype) -> list[common.AotSpec]:
    cfg = stream_weight_grad_default_config(4096, n, C)
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    return [common.AotSpec(
        name="stream_weight_grad", fn=stream_weight_grad_kernel,
        signature={"g_ptr": ptr, "x_ptr": ptr, "dw_ptr": "*fp32", "T": "i32", "C": "i32", "N": "constexpr",
                   "BLOCK_N": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"},
        constexprs={"N": n, "BLOCK_N": common.next_pow2(n), "BLOCK_T": cfg["BLOCK_T"], "BLOCK_C": cfg["BLOCK_C"]},
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], config=cfg)]


# -- composites ----------------------------------------------------------------------------------
def _pre_mix(mixes: Tensor, scale: Tensor, base: Tensor, n: int, pre_eps: float) -> Tensor:
    """pre_mix = sigmoid(mixes[:, :n] * scale0 + base[:n]) + pre_eps (per token, O(n))."""
    return torch.sigmoid(torch.addcmul(base[:n], mixes[:, :n], scale[0])) + pre_eps


def mhc_pre_fwd(residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps):
    """-> (layer_input, post_mix, comb_mix, mixes, rstd); two passes over the residual."""
    mixes, rstd = norm_fn.norm_fn_fwd(residual, fn, norm_weight, norm_eps)
    pre, post, comb = sinkhorn.split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps)
    return mix.pre_apply_mix_fwd(residual, pre), post, comb, mixes, rstd


def mhc_pre_bwd(grad_layer_input, grad_post, grad_comb, residual, fn, scale, base, norm_weight, mixes, rstd,
                grad_residual, pre_eps, post_mult, iters, sinkhorn_eps):
    """-> (d_residual, d_fn_eff, d_scale, d_base); two passes over the residual, one full-size write."""
    n = residual.shape[1]
    pre = _pre_mix(mixes, scale, base, n, pre_eps)
    d_pre = stream_weight_grad(grad_layer_input, residual)
    d_mixes, d_scale, d_base = sinkhorn.split_mixes_bwd(d_pre, grad_post, grad_comb, mixes, scale, base, post_mult,
                                                        iters, sinkhorn_eps)
    d_res, d_fn = norm_fn.norm_fn_bwd(d_mixes, residual, fn, norm_weight, mixes, rstd, grad_residual=grad_residual,
                                      apply_grad=grad_layer_input, pre_mix=pre)
    return d_res, d_fn, d_scale, d_base


def mhc_head_fwd(residual, fn, scale, base, norm_weight, norm_eps, pre_eps):
    """-> (out (T, C), mixes (T, n), rstd): out = sum_i (sigmoid(mixes * scale + base) + pre_eps)_i x_i."""
    mixes, rstd = norm_fn.norm_fn_fwd(residual, fn, norm_weight, norm_eps)
    w = torch.sigmoid(torch.addcmul(base, mixes, scale)) + pre_eps
    return mix.pre_apply_mix_fwd(residual, w), mixes, rstd


def mhc_head_bwd(grad, residual, fn, scale, base, norm_weight, mixes, rstd, pre_eps):
    """-> (d_residual, d_fn_eff, d_scale (1,), d_base (n,)); the residual gradient is written once."""
    z = torch.addcmul(base, mixes, scale)
    s = torch.sigmoid(z)
    d_z = stream_weight_grad(grad, residual) * (s * torch.sigmoid(-z))
    d_res, d_fn = norm_fn.norm_fn_bwd(d_z * scale, residual, fn, norm_weight, mixes, rstd, apply_grad=grad,
                                      pre_mix=s + pre_eps)
    return d_res, d_fn, (d_z * mixes).sum().reshape(1), d_z.sum(0)


def post_pre_fwd(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, norm_eps, pre_eps,
                 post_mult, iters, sinkhorn_eps):
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd) of the next sublayer."""
    new_residual = mix.post_fwd(layer_output, residual, post_mix, comb_mix)
    return (new_residual,) + mhc_pre_fwd(new_residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult,
                                         iters, sinkhorn_eps)
