"""Triton kernels for the streaming mix ops: ``pre_apply_mix``, ``post`` and ``expand``, forward and backward.

These ops touch every element of the residual and do O(n) to O(n^2) flops per element, so
they are bound by memory traffic alone. Each kernel therefore reads every full-size input
exactly once and writes every full-size output exactly once (the ``bytes`` of
:data:`mhc_kernels.specs.SPECS`), with the small per-token mixes (float32) re-read from cache.

Layout (canonical, contiguous): residual ``x`` ``(T, n, C)`` and ``layer_output`` / ``hidden``
``(T, C)`` in bf16, fp16 or fp32; ``pre_mix`` / ``post_mix`` ``(T, n)`` and ``comb_mix``
``(T, n, n)`` in float32. All arithmetic is float32; each full-size output is rounded to the
residual dtype once.

Tiling. A program owns ``BLOCK_T`` tokens:

* forward kernels (and ``expand_bwd``) also own one ``BLOCK_C`` slice of the hidden dim,
  grid ``(cdiv(T, BLOCK_T), cdiv(C, BLOCK_C))``; nothing is reduced over C;
* backward kernels reduce over C (``d_pre_mix``, ``d_post_mix``, ``d_comb_mix``), so a
  program walks its share of C in ``BLOCK_C`` steps, grid ``(cdiv(T, BLOCK_T), SPLIT_C)``.
  With ``SPLIT_C == 1`` it walks all of C and writes the sums; with ``SPLIT_C > 1`` (few
  tokens, so the GPU needs more programs) each split writes a float32 partial and the
  partials are summed over the splits in a fixed order. No atomics: results are
  deterministic run to run.

Configs are dicts with ``block_T``, ``block_C`` (powers of two: the kernels' ``BLOCK_T``, ``BLOCK_C``),
``split_C`` (backward only: ``SPLIT_C``), ``num_warps`` and ``num_stages``. Any C works (every access is
masked); a C that is a multiple of ``block_C`` simply has no partial tail block. ``T == 0`` returns empty
outputs without a launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_kernels.composite import STREAM_WEIGHT_GRAD
from mhc_kernels.specs import prev_pow2

from . import common

Tensor = torch.Tensor

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
_AOT_TOKENS = 4096  # representative token count for ahead-of-time builds


def _new_output(shape, dtype, device) -> Tensor:
    """Allocate a kernel output (uninitialised; every element is written by a kernel).

    One place for every allocation, so tests can poison outputs with NaN to prove that.
    """
    return torch.empty(shape, dtype=dtype, device=device)


# ================================================================================================
# Kernels
# ================================================================================================
@triton.jit
def pre_apply_mix_fwd_kernel(x_ptr, pre_mix_ptr, out_ptr, T, C,
                             N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """layer_input[t, c] = sum_i pre_mix[t, i] * x[t, i, c], summed in the order i = 0..N-1."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < T
    tc_ok = t_ok[:, None] & (c < C)[None, :]
    t64 = t.to(tl.int64)
    x_row = x_ptr + (t64 * N)[:, None] * C + c[None, :]  # stream 0 of each token
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(N):
        w = tl.load(pre_mix_ptr + t64 * N + i, mask=t_ok, other=0.0)
        x = tl.load(x_row + i * C, mask=tc_ok, other=0.0)
        acc += w[:, None] * x.to(tl.float32)
    tl.store(out_ptr + t64[:, None] * C + c[None, :], acc.to(out_ptr.dtype.element_ty), mask=tc_ok)


@triton.jit
def collapse_norm_fwd_kernel(x_ptr, pre_mix_ptr, w_ptr, out_ptr, out_rstd_ptr, T, C, eps,
                             N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T),): the collapse with the sublayer's RMSNorm for BLOCK_T tokens, walking C.

    Pass 1: u = round(sum_i pre_mix_i x_i) (pre_apply_mix's arithmetic) stored to ``out``, and sum u^2 of the
    rounded values per token. rho = rsqrt(sum / C + eps) -> out_rstd. Pass 2 (after a barrier, so the
    program's own stores are visible to all its threads): out = round(u * rho * w), u re-read from cache.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tc_ok = t_ok[:, None] & (c < C)[None, :]
        x_row = x_ptr + (t64 * N)[:, None] * C + c[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for i in tl.static_range(N):
            w = tl.load(pre_mix_ptr + t64 * N + i, mask=t_ok, other=0.0)
            x = tl.load(x_row + i * C, mask=tc_ok, other=0.0)
            acc += w[:, None] * x.to(tl.float32)
        u = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + t64[:, None] * C + c[None, :], u, mask=tc_ok)
        uf = u.to(tl.float32)
        ss += tl.sum(uf * uf, axis=1)
    rho = tl.math.rsqrt(ss / C + eps)
    tl.store(out_rstd_ptr + t, rho, mask=t_ok)
    tl.debug_barrier()
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tc_ok = t_ok[:, None] & (c < C)[None, :]
        offs = t64[:, None] * C + c[None, :]
        u = tl.load(out_ptr + offs, mask=tc_ok, other=0.0).to(tl.float32)
        g = tl.load(w_ptr + c, mask=c < C, other=0.0)
        tl.store(out_ptr + offs, (u * rho[:, None] * g[None, :]).to(out_ptr.dtype.element_ty), mask=tc_ok)


@triton.jit
def pre_apply_mix_bwd_kernel(g_ptr, x_ptr, pre_mix_ptr, d_x_ptr, d_pre_ptr, T, C, c_per_split,
                             N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """d_x[t, i, c] = pre_mix[t, i] * g[t, c];  d_pre[s, t, i] = sum over split s's C of g[t, c] * x[t, i, c]."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    ti_ok = t_ok[:, None] & (i < N)[None, :]
    t64 = t.to(tl.int64)
    w = tl.load(pre_mix_ptr + t64[:, None] * N + i[None, :], mask=ti_ok, other=0.0)
    row = (t64[:, None] * N + i[None, :]) * C  # (BLOCK_T, BLOCK_N) offsets of x[t, i, 0]
    c_start = split * c_per_split
    c_end = tl.minimum(C, c_start + c_per_split)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_end
        g = tl.load(g_ptr + t64[:, None] * C + c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        offs = row[:, :, None] + c[None, None, :]
        m3 = ti_ok[:, :, None] & c_ok[None, None, :]
        x = tl.load(x_ptr + offs, mask=m3, other=0.0).to(tl.float32)
        tl.store(d_x_ptr + offs, (w[:, :, None] * g[:, None, :]).to(d_x_ptr.dtype.element_ty), mask=m3)
        acc += tl.sum(x * g[:, None, :], axis=2)
    part = split.to(tl.int64) * T * N
    tl.store(d_pre_ptr + part + t64[:, None] * N + i[None, :], acc, mask=ti_ok)


@triton.jit
def post_fwd_kernel(y_ptr, x_ptr, post_mix_ptr, comb_mix_ptr, out_ptr, T, C,
                    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, i, c] = post_mix[t, i] * y[t, c] + sum_j comb_mix[t, j, i] * x[t, j, c].

    The n residual rows of the C block are each loaded once and feed all n outputs.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    c_ok = c < C
    tc_ok = t_ok[:, None] & c_ok[None, :]
    ti_ok = t_ok[:, None] & (i < N)[None, :]
    t64 = t.to(tl.int64)
    y = tl.load(y_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
    p = tl.load(post_mix_ptr + t64[:, None] * N + i[None, :], mask=ti_ok, other=0.0)
    acc = p[:, :, None] * y[:, None, :]  # (BLOCK_T, BLOCK_N, BLOCK_C): all n output streams
    x_row = x_ptr + (t64 * N)[:, None] * C + c[None, :]
    comb_row = comb_mix_ptr + t64[:, None] * (N * N) + i[None, :]
    for j in tl.static_range(N):
        w = tl.load(comb_row + j * N, mask=ti_ok, other=0.0)  # comb_mix[t, j, :]: stream j into every i
        x = tl.load(x_row + j * C, mask=tc_ok, other=0.0).to(tl.float32)
        acc += w[:, :, None] * x[:, None, :]
    offs = ((t64[:, None] * N + i[None, :]) * C)[:, :, None] + c[None, None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ti_ok[:, :, None] & c_ok[None, None, :])


@triton.jit
def post_bwd_kernel(g_ptr, y_ptr, x_ptr, post_mix_ptr, comb_mix_ptr,
                    d_y_ptr, d_x_ptr, d_post_ptr, d_comb_ptr, T, C, c_per_split,
                    N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over grad, layer_output and the residual (split s owns a contiguous share of C):

    d_y[t, c] = sum_i post_mix[t, i] g[t, i, c];  d_x[t, j, c] = sum_i comb_mix[t, j, i] g[t, i, c];
    d_post[s, t, i] = sum_c g[t, i, c] y[t, c];   d_comb[s, t, j, i] = sum_c x[t, j, c] g[t, i, c].
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    i = tl.arange(0, BLOCK_N)
    t_ok = t < T
    ti_ok = t_ok[:, None] & (i < N)[None, :]
    t64 = t.to(tl.int64)
    p = tl.load(post_mix_ptr + t64[:, None] * N + i[None, :], mask=ti_ok, other=0.0)
    g_row = (t64[:, None] * N + i[None, :]) * C  # offsets of g[t, i, 0]
    comb_row = comb_mix_ptr + t64[:, None] * (N * N) + i[None, :]
    c_start = split * c_per_split
    c_end = tl.minimum(C, c_start + c_per_split)
    acc_post = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_comb = tl.zeros((BLOCK_T, BLOCK_N, BLOCK_N), dtype=tl.float32)  # [t, j, i]
    j_idx = tl.arange(0, BLOCK_N)
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_end
        tc_ok = t_ok[:, None] & c_ok[None, :]
        m3 = ti_ok[:, :, None] & c_ok[None, None, :]
        g = tl.load(g_ptr + g_row[:, :, None] + c[None, None, :], mask=m3, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
        d_y = tl.sum(p[:, :, None] * g, axis=1)
        tl.store(d_y_ptr + t64[:, None] * C + c[None, :], d_y.to(d_y_ptr.dtype.element_ty), mask=tc_ok)
        acc_post += tl.sum(g * y[:, None, :], axis=2)
        for j in tl.static_range(N):
            x_offs = (t64 * N + j)[:, None] * C + c[None, :]
            x = tl.load(x_ptr + x_offs, mask=tc_ok, other=0.0).to(tl.float32)
            w = tl.load(comb_row + j * N, mask=ti_ok, other=0.0)  # comb_mix[t, j, :]
            d_x = tl.sum(w[:, :, None] * g, axis=1)
            tl.store(d_x_ptr + x_offs, d_x.to(d_x_ptr.dtype.element_ty), mask=tc_ok)
            dots = tl.sum(x[:, None, :] * g, axis=2)  # (BLOCK_T, BLOCK_N): <x_j, g_i> for every i
            acc_comb += tl.where(j_idx[None, :, None] == j, dots[:, None, :], 0.0)
    part = split.to(tl.int64) * T
    tl.store(d_post_ptr + (part + t64[:, None]) * N + i[None, :], acc_post, mask=ti_ok)
    comb_offs = (part + t64[:, None, None]) * (N * N) + j_idx[None, :, None] * N + i[None, None, :]
    comb_ok = ti_ok[:, None, :] & (j_idx < N)[None, :, None]
    tl.store(d_comb_ptr + comb_offs, acc_comb, mask=comb_ok)


@triton.jit
def expand_fwd_kernel(h_ptr, out_ptr, T, C, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[t, i, c] = h[t, c] for every stream i (h read once, written N times)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tc_ok = (t < T)[:, None] & (c < C)[None, :]
    t64 = t.to(tl.int64)
    h = tl.load(h_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0)
    out_row = out_ptr + (t64 * N)[:, None] * C + c[None, :]
    for i in tl.static_range(N):
        tl.store(out_row + i * C, h, mask=tc_ok)


@triton.jit
def expand_bwd_kernel(g_ptr, d_h_ptr, T, C, N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """d_h[t, c] = sum_i g[t, i, c], float32 in the order i = 0..N-1, rounded once."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tc_ok = (t < T)[:, None] & (c < C)[None, :]
    t64 = t.to(tl.int64)
    g_row = g_ptr + (t64 * N)[:, None] * C + c[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(N):
        acc += tl.load(g_row + i * C, mask=tc_ok, other=0.0).to(tl.float32)
    tl.store(d_h_ptr + t64[:, None] * C + c[None, :], acc.to(d_h_ptr.dtype.element_ty), mask=tc_ok)


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


# ================================================================================================
# Configs
# ================================================================================================
_TARGET_PROGRAMS = 264  # ~2 waves of an H100 (132 SMs): below this a backward kernel splits C


def _tile(T: int, C: int, elems: int, rows: int = 1, max_block_c: int = 1024) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) covering about ``elems`` full-size values (``rows`` of them per token and C).

    C gets the block first (contiguous, vectorised); short rows are packed several tokens
    per program, never more tokens than there are.
    """
    block_c = max(16, min(common.next_pow2(C), max_block_c, prev_pow2(elems // rows)))
    block_t = max(1, min(prev_pow2(elems // (rows * block_c)), 16, common.next_pow2(max(T, 1))))
    return block_t, block_c


def _warps(elems: int) -> int:
    """4 warps for ~1-4k elements per program, fewer for small tiles, 8 for big ones."""
    return max(1, min(8, prev_pow2(elems // 256)))


def _fwd_config(T, n, C, rows_live: int, budget: int) -> dict:
    bt, bc = _tile(T, C, budget, rows=rows_live)
    return {"block_T": bt, "block_C": bc, "num_warps": _warps(bt * bc * rows_live), "num_stages": 1}


def _bwd_config(T, n, C, budget: int) -> dict:
    """Backward kernels hold the (BLOCK_T, next_pow2(n), BLOCK_C) block of grad or residual."""
    bn = common.next_pow2(n)
    bt, bc = _tile(T, C, budget, rows=bn, max_block_c=512)
    token_programs = triton.cdiv(max(T, 1), bt)
    c_blocks = triton.cdiv(C, bc)
    split = max(1, min(c_blocks, triton.cdiv(_TARGET_PROGRAMS, token_programs), 32))
    return {"block_T": bt, "block_C": bc, "split_C": split, "num_warps": _warps(bt * bn * bc), "num_stages": 2}


def _defaults(op: str, T: int, n: int, C: int) -> dict:
    bn = common.next_pow2(n)
    if op == "pre_apply_mix":
        return _fwd_config(T, n, C, 1, 2048)
    if op == "post":
        return _fwd_config(T, n, C, bn, 4096)
    if op == "expand":
        return _fwd_config(T, n, C, 1, 2048)
    if op == "expand_bwd":
        return _fwd_config(T, n, C, 1, 2048)
    if op == "pre_apply_mix_bwd":
        return _bwd_config(T, n, C, 2048)
    if op == "post_bwd":  # n >= 4 gets 4096: 2048 spills 12 bytes on sm_100a with triton 3.6 (n=4) or 3.9 (n=8)
        return _bwd_config(T, n, C, 4096 if bn >= 4 else 2048)
    if op == "collapse_norm":  # a few tokens per program walking all of C; independent of T (batch invariant)
        bc = min(common.next_pow2(C), 1024)
        return {"block_T": max(1, min(4, 2048 // bc)), "block_C": bc, "num_warps": 4, "num_stages": 1}
    if op == STREAM_WEIGHT_GRAD:  # one token per program, walking all of C
        return {"block_T": 1, "block_C": min(common.next_pow2(C), max(16, 1024 // bn)), "num_warps": 4,
                "num_stages": 2}
    raise KeyError(op)


def config_space(op: str, call) -> list[dict]:
    if op == "mhc_head_sp":   # the norm kernel's tiles, pre_apply_mix at its default
        d = default_config(op, call)
        out = [d]
        for bt in (1, 2, 4):
            for bc in (256, 512, 1024, 2048):
                cand = dict(d, collapse_norm={"block_T": bt, "block_C": bc, "num_warps": 4 if bc < 2048 else 8,
                                              "num_stages": 1})
                if cand not in out and bc <= max(256, 2 * common.next_pow2(call.C)):
                    out.append(cand)
        return out
    bn = common.next_pow2(call.n)
    rows = 1 if op in ("pre_apply_mix", "expand", "expand_bwd") else bn
    cmax = max(16, common.next_pow2(call.C))
    out = []
    for bt in (1, 2, 4, 8):
        for bc in (64, 128, 256, 512, 1024, 2048):
            if bc > 2 * cmax and bc > 64:  # blocks much wider than C only add masked lanes
                continue
            elems = bt * rows * bc
            if not 64 <= elems <= 8192:
                continue
            for w in (2, 4, 8):
                if op.endswith("_bwd") and op != "expand_bwd":
                    for split in sorted({1, _bwd_config(call.T, call.n, call.C, elems)["split_C"]}):
                        for stages in (1, 2, 3):
                            out.append({"block_T": bt, "block_C": bc, "split_C": split, "num_warps": w,
                                        "num_stages": stages})
                else:
                    out.append({"block_T": bt, "block_C": bc, "num_warps": w, "num_stages": 1})
    default = _defaults(op, call.T, call.n, call.C)
    if default not in out:
        out.insert(0, default)
    return out


def default_config(op: str, call) -> dict:
    """The default config of ``op`` (pre_apply_mix[_bwd], post[_bwd], expand[_bwd]) for ``call``; for
    ``mhc_head_sp`` its two kernels' ``{"pre_apply_mix": ..., "collapse_norm": ...}``."""
    if op == "mhc_head_sp":
        return {k: _defaults(k, call.T, call.n, call.C) for k in ("pre_apply_mix", "collapse_norm")}
    return _defaults(op, call.T, call.n, call.C)


def _check(op: str, cfg: dict) -> dict:
    """The config the core resolved (or a caller gave), checked: a bad one fails with what is wrong."""
    for key in ("block_T", "block_C"):
        v = cfg.get(key)
        if not isinstance(v, int) or v < 1 or v & (v - 1):
            raise ValueError(f"triton {op}: config {key} must be a power of two >= 1; got {v!r} in {cfg}")
    return cfg


def _splits(cfg: dict, C: int) -> tuple[int, int]:
    """(number of C splits actually used, C elements per split: a multiple of BLOCK_C)."""
    bc = cfg["block_C"]
    c_blocks = triton.cdiv(C, bc)
    split = max(1, min(int(cfg.get("split_C", 1)), c_blocks))
    per = triton.cdiv(c_blocks, split) * bc
    return triton.cdiv(C, per), per


def _sum_splits(part: Tensor) -> Tensor:
    """Sum per-split partials (leading dim) in a fixed order: deterministic."""
    return part[0] if part.shape[0] == 1 else part.sum(0)


# ================================================================================================
# Launch wrappers (signatures and outputs of mhc_kernels.reference.torch_ref)
# ================================================================================================
def pre_apply_mix_fwd(residual: Tensor, pre_mix: Tensor, *, config: dict,
                      out: Tensor | None = None) -> Tensor:
    """layer_input[t, c] = sum_i pre_mix[t, i] * residual[t, i, c]  (contract §4).

    Args:
        residual: ``(T, n, C)`` bf16/fp16/fp32, contiguous.
        pre_mix: ``(T, n)`` float32.
        config: ``block_T``, ``block_C``, ``num_warps``, ``num_stages`` (resolved by the core).
        out: optional contiguous ``(T, C)`` residual-dtype tensor to write into (e.g. a slice of a
            multi-layer buffer); allocated when ``None``.

    Returns:
        layer_input ``(T, C)`` in the residual's dtype.

    Bytes moved: ``SPECS["pre_apply_mix"].bytes`` -- the residual is read once, layer_input
    written once.
    """
    T, n, C = residual.shape
    if out is None:
        out = _new_output((T, C), residual.dtype, residual.device)
    if out.numel() == 0:
        return out
    cfg = _check("pre_apply_mix", config)
    grid = (triton.cdiv(T, cfg["block_T"]), triton.cdiv(C, cfg["block_C"]))
    pre_apply_mix_fwd_kernel[grid](residual, pre_mix, out, T, C, N=n, BLOCK_T=cfg["block_T"],
                                   BLOCK_C=cfg["block_C"], num_warps=cfg["num_warps"],
                                   num_stages=cfg["num_stages"])
    return out


def collapse_norm_fwd(residual: Tensor, pre: Tensor, out_norm_weight: Tensor | None, out_norm_eps: float, *,
                      config: dict) -> tuple[Tensor, Tensor]:
    """``mhc_head_sp``'s forward (contract §14) -> ``(out (T, C), out_rstd (T,))``: the collapse with ``pre``
    and, with a weight, the sublayer's RMSNorm of the rounded collapse in the same kernel
    (:func:`collapse_norm_fwd_kernel`; ``out_rstd`` is its rho); without one ``pre_apply_mix`` and ones.

    ``config``: ``{"pre_apply_mix": ..., "collapse_norm": ...}`` (``block_T``, ``block_C``, ``num_warps``,
    ``num_stages``). Bytes per token with the norm: the residual read once, ``out`` written, re-read (cache)
    and rewritten.
    """
    T, n, C = residual.shape
    if out_norm_weight is None:
        return (pre_apply_mix_fwd(residual, pre, config=config["pre_apply_mix"]),
                torch.ones((T,), dtype=torch.float32, device=residual.device))
    out = _new_output((T, C), residual.dtype, residual.device)
    out_rstd = _new_output((T,), torch.float32, residual.device)
    if T == 0:
        return out, out_rstd
    cfg = _check("collapse_norm", config["collapse_norm"])
    collapse_norm_fwd_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        residual, pre, out_norm_weight.float().contiguous(), out, out_rstd, T, C, float(out_norm_eps), N=n,
        BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out, out_rstd


def pre_apply_mix_bwd(grad: Tensor, residual: Tensor, pre_mix: Tensor, *,
                      config: dict) -> tuple[Tensor, Tensor]:
    """Backward of :func:`pre_apply_mix_fwd`.

    Args:
        grad: ``(T, C)`` gradient of layer_input, residual dtype.
        residual: ``(T, n, C)`` bf16/fp16/fp32.
        pre_mix: ``(T, n)`` float32.
        config: ``block_T``, ``block_C``, ``split_C``, ``num_warps``, ``num_stages``.

    Returns:
        ``d_residual[t, i, c] = pre_mix[t, i] * grad[t, c]`` ``(T, n, C)`` in the residual dtype and
        ``d_pre_mix[t, i] = <grad[t], residual[t, i]>`` ``(T, n)`` float32 (deterministic).

    Bytes moved: ``SPECS["pre_apply_mix_bwd"].bytes`` -- grad and the residual are read once,
    d_residual written once (plus ``split_C`` float32 partials of d_pre_mix when C is split).
    """
    T, n, C = residual.shape
    d_x = _new_output((T, n, C), residual.dtype, residual.device)
    if T == 0 or C == 0:
        return d_x, torch.zeros((T, n), dtype=pre_mix.dtype, device=residual.device)
    cfg = _check("pre_apply_mix_bwd", config)
    split, per = _splits(cfg, C)
    d_pre = _new_output((split, T, n), torch.float32, residual.device)
    grid = (triton.cdiv(T, cfg["block_T"]), split)
    pre_apply_mix_bwd_kernel[grid](grad, residual, pre_mix, d_x, d_pre, T, C, per, N=n,
                                   BLOCK_N=common.next_pow2(n), BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"],
                                   num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return d_x, _sum_splits(d_pre)


def post_fwd(layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor, *,
             config: dict, out: Tensor | None = None) -> Tensor:
    """new_residual[t, i] = post_mix[t, i] * layer_output[t] + sum_j comb_mix[t, j, i] * residual[t, j]  (contract §5).

    Args:
        layer_output: ``(T, C)`` the sublayer output, residual dtype.
        residual: ``(T, n, C)`` bf16/fp16/fp32.
        post_mix: ``(T, n)`` float32.
        comb_mix: ``(T, n, n)`` float32; ``comb_mix[t, j, i]`` weights stream j into stream i.
        config: ``block_T``, ``block_C``, ``num_warps``, ``num_stages``.
        out: optional contiguous ``(T, n, C)`` residual-dtype tensor to write into; must not
            overlap ``residual``. Allocated when ``None``.

    Returns:
        new_residual ``(T, n, C)`` in the residual dtype.

    Bytes moved: ``SPECS["post"].bytes`` -- the residual and layer_output are read exactly once
    (a program loads the n rows of its C block once and writes all n outputs).
    """
    T, n, C = residual.shape
    if out is None:
        out = _new_output((T, n, C), residual.dtype, residual.device)
    if out.numel() == 0:
        return out
    cfg = _check("post", config)
    grid = (triton.cdiv(T, cfg["block_T"]), triton.cdiv(C, cfg["block_C"]))
    post_fwd_kernel[grid](layer_output, residual, post_mix, comb_mix, out, T, C, N=n, BLOCK_N=common.next_pow2(n),
                          BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"], num_warps=cfg["num_warps"],
                          num_stages=cfg["num_stages"])
    return out


def post_bwd(grad: Tensor, layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor, *,
             config: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`post_fwd`, one pass over grad, layer_output and the residual.

    Args:
        grad: ``(T, n, C)`` gradient of new_residual, residual dtype.
        layer_output: ``(T, C)``; residual: ``(T, n, C)``; post_mix ``(T, n)`` and comb_mix ``(T, n, n)`` float32.
        config: ``block_T``, ``block_C``, ``split_C``, ``num_warps``, ``num_stages``.

    Returns:
        ``d_layer_output[t] = sum_i post_mix[t, i] g[t, i]`` ``(T, C)`` (layer_output dtype),
        ``d_residual[t, j] = sum_i comb_mix[t, j, i] g[t, i]`` ``(T, n, C)`` (residual dtype),
        ``d_post_mix[t, i] = <g[t, i], y[t]>`` ``(T, n)`` and
        ``d_comb_mix[t, j, i] = <x[t, j], g[t, i]>`` ``(T, n, n)``, float32 and deterministic.

    Bytes moved: ``SPECS["post_bwd"].bytes`` -- grad, layer_output and the residual are each
    read once; d_layer_output and d_residual written once.
    """
    T, n, C = residual.shape
    dev = residual.device
    d_y = _new_output((T, C), layer_output.dtype, dev)
    d_x = _new_output((T, n, C), residual.dtype, dev)
    if T == 0 or C == 0:
        return (d_y, d_x, torch.zeros((T, n), dtype=post_mix.dtype, device=dev),
                torch.zeros((T, n, n), dtype=comb_mix.dtype, device=dev))
    cfg = _check("post_bwd", config)
    split, per = _splits(cfg, C)
    d_post = _new_output((split, T, n), torch.float32, dev)
    d_comb = _new_output((split, T, n, n), torch.float32, dev)
    grid = (triton.cdiv(T, cfg["block_T"]), split)
    post_bwd_kernel[grid](grad, layer_output, residual, post_mix, comb_mix, d_y, d_x, d_post, d_comb, T, C, per,
                          N=n, BLOCK_N=common.next_pow2(n), BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"],
                          num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return d_y, d_x, _sum_splits(d_post), _sum_splits(d_comb)


def expand_fwd(hidden: Tensor, n: int, *, config: dict) -> Tensor:
    """residual[t, i] = hidden[t] for i < n  (contract §7): a fresh tensor, never a view of ``hidden``.

    Args:
        hidden: ``(T, C)`` bf16/fp16/fp32.
        n: number of streams.
        config: ``block_T``, ``block_C``, ``num_warps``, ``num_stages``.

    Returns:
        ``(T, n, C)`` in hidden's dtype. Bytes moved: ``SPECS["expand"].bytes`` (hidden read once).
    """
    T, C = hidden.shape
    out = _new_output((T, n, C), hidden.dtype, hidden.device)
    if out.numel() == 0:
        return out
    cfg = _check("expand", config)
    grid = (triton.cdiv(T, cfg["block_T"]), triton.cdiv(C, cfg["block_C"]))
    expand_fwd_kernel[grid](hidden, out, T, C, N=n, BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"],
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def expand_bwd(grad: Tensor, *, config: dict) -> Tensor:
    """d_hidden[t, c] = sum_i grad[t, i, c], summed in float32 and rounded once.

    Args:
        grad: ``(T, n, C)`` bf16/fp16/fp32.
        config: ``block_T``, ``block_C``, ``num_warps``, ``num_stages``.

    Returns:
        ``(T, C)`` in grad's dtype. Bytes moved: ``SPECS["expand_bwd"].bytes`` (grad read once).
    """
    T, n, C = grad.shape
    out = _new_output((T, C), grad.dtype, grad.device)
    if out.numel() == 0:
        return out
    cfg = _check("expand_bwd", config)
    grid = (triton.cdiv(T, cfg["block_T"]), triton.cdiv(C, cfg["block_C"]))
    expand_bwd_kernel[grid](grad, out, T, C, N=n, BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"],
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def stream_weight_grad(grad: Tensor, residual: Tensor, *, config: dict) -> Tensor:
    """d_w[t, i] = <grad[t], residual[t, i]>: grad (T, C), residual (T, n, C) -> (T, n) float32.

    pre_apply_mix's backward without d_residual (the composites' backward adds that term inside
    norm_fn_bwd). Each program owns ``block_T`` tokens and walks all of C, so the per-token sums are
    deterministic (fixed order, no atomics). Traffic: reads the residual and grad once, writes T*n floats.
    """
    T, n, C = residual.shape
    out = torch.empty((T, n), dtype=torch.float32, device=residual.device)
    if T == 0:
        return out
    cfg = _check(STREAM_WEIGHT_GRAD, config)
    stream_weight_grad_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        grad, residual, out, T, C, N=n, BLOCK_N=common.next_pow2(n), BLOCK_T=cfg["block_T"], BLOCK_C=cfg["block_C"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


# ================================================================================================
# Ahead-of-time specs
# ================================================================================================
def aot_specs(n: int, C: int, dtype: torch.dtype) -> list[common.AotSpec]:
    """Every kernel of this module at its default config for T = 4096 tokens of ``(n, C)`` in ``dtype``.

    Integer arguments carry a ``":16"`` divisibility hint when their representative value
    is a multiple of 16 (the specialisation Triton's JIT makes at launch).
    """
    ptr = _PTR[dtype]
    bn = common.next_pow2(n)
    T = _AOT_TOKENS

    def spec(name, fn, tensors, scalars, op, with_bn=True, floats=()):
        cfg = _defaults(op, T, n, C)
        values = {"T": T, "C": C, "c_per_split": _splits(cfg, C)[1]}
        sig = dict(tensors)
        # ":16" marks an integer divisible by 16, as Triton's launcher would specialise it
        sig.update({s: "i32:16" if values[s] % 16 == 0 else "i32" for s in scalars})
        sig.update({f: "fp32" for f in floats})
        const = {"N": n}
        if with_bn:
            const["BLOCK_N"] = bn
        const.update({"BLOCK_T": cfg["block_T"], "BLOCK_C": cfg["block_C"]})
        sig.update({k: "constexpr" for k in const})
        return common.AotSpec(name=name, fn=fn, signature=sig, constexprs=const, num_warps=cfg["num_warps"],
                              num_stages=cfg["num_stages"], config=cfg)

    f32 = "*fp32"
    return [
        spec("pre_apply_mix_fwd", pre_apply_mix_fwd_kernel,
             {"x_ptr": ptr, "pre_mix_ptr": f32, "out_ptr": ptr}, ("T", "C"), "pre_apply_mix", with_bn=False),
        spec("pre_apply_mix_bwd", pre_apply_mix_bwd_kernel,
             {"g_ptr": ptr, "x_ptr": ptr, "pre_mix_ptr": f32, "d_x_ptr": ptr, "d_pre_ptr": f32},
             ("T", "C", "c_per_split"), "pre_apply_mix_bwd"),
        spec("post_fwd", post_fwd_kernel,
             {"y_ptr": ptr, "x_ptr": ptr, "post_mix_ptr": f32, "comb_mix_ptr": f32, "out_ptr": ptr},
             ("T", "C"), "post"),
        spec("post_bwd", post_bwd_kernel,
             {"g_ptr": ptr, "y_ptr": ptr, "x_ptr": ptr, "post_mix_ptr": f32, "comb_mix_ptr": f32,
              "d_y_ptr": ptr, "d_x_ptr": ptr, "d_post_ptr": f32, "d_comb_ptr": f32},
             ("T", "C", "c_per_split"), "post_bwd"),
        spec("expand_fwd", expand_fwd_kernel, {"h_ptr": ptr, "out_ptr": ptr}, ("T", "C"), "expand", with_bn=False),
        spec("expand_bwd", expand_bwd_kernel, {"g_ptr": ptr, "d_h_ptr": ptr}, ("T", "C"), "expand_bwd",
             with_bn=False),
        spec("stream_weight_grad", stream_weight_grad_kernel, {"g_ptr": ptr, "x_ptr": ptr, "dw_ptr": f32},
             ("T", "C"), STREAM_WEIGHT_GRAD),
        spec("collapse_norm_fwd", collapse_norm_fwd_kernel,
             {"x_ptr": ptr, "pre_mix_ptr": f32, "w_ptr": f32, "out_ptr": ptr, "out_rstd_ptr": f32},
             ("T", "C"), "collapse_norm", with_bn=False, floats=("eps",)),
    ]
