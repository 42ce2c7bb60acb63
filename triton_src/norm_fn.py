"""Triton kernels for ``norm_fn`` (contract §2) and its backward (contract §9).

Notation as in the contract (reference/README.md): ``x`` the residual ``(T, n, C)`` (bf16, fp16 or fp32),
``x_flat = x.reshape(T, K)`` with ``K = n*C``, ``fn`` the float32 projection
``(rows, K)`` (``rows = m = n*(n+2)`` for a site, ``n`` for ``mhc_head``), the
optional RMSNorm gain ``norm_weight`` ``(K,)`` folded as ``fn_eff = fn * norm_weight``
inside the kernels (nothing of size ``(rows, K)`` is materialised in the forward),
``rstd = rsqrt(sum_q x_flat[q]^2 / K + norm_eps)``. All sums run in float32; the
dot products use ``tl.dot`` with a float32-accurate input precision
(``tf32x3`` by default, or ``ieee``), never plain tf32.

Forward (:func:`norm_fn_fwd`)::

    mixes[t, r] = (sum_q x_flat[t, q] * fn_eff[r, q]) * rstd[t]

One pass over the residual: a program owns ``block_T`` tokens and a contiguous
range of ``K`` and produces all ``rows`` dot products plus the sum of squares of
its tokens. With ``split_K == 1`` it applies ``rsqrt`` and stores ``mixes`` and
``rstd`` itself. With ``split_K > 1`` (small ``T``: too few token blocks to fill
the GPU) the ``K`` range is cut into ``split_K`` parts whose partial dot products
and sums of squares go to a float32 buffer; a second, tiny kernel adds the splits
in a fixed order (deterministic, no atomics) and applies ``rsqrt``.

Backward (:func:`norm_fn_bwd`), with ``g = dL/dmixes``::

    d_x_flat[t, q] = rstd[t] * sum_r g[t, r] fn_eff[r, q] - (rstd[t]^2 / K) * (g[t] . mixes[t]) * x_flat[t, q]
                   (+ grad_residual[t, i, c] + apply_w[t, i] * apply_grad[t, c],  q = i*C + c)
    d_fn_eff[r, q] = sum_t g[t, r] * rstd[t] * x_flat[t, q]

The optional extras make this the single residual-gradient kernel of a whole mHC
site's pre side: the gradient from ``post`` and the collapse's gradient are added in
float32 and the sum is rounded to the residual dtype once. A program owns one
``(stream i, channel block)`` tile of ``K`` (so ``apply_w[t, i]`` is one value per
token) and a range of tokens; ``d_fn_eff`` is a reduction over tokens, written as
one float32 partial per token range and summed with ``torch.sum`` (fixed order,
deterministic).
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from mhc_kernels.specs import mix_count, prev_pow2

from . import common

PRECISIONS = ("tf32x3", "ieee")
_TARGET_PROGRAMS = 264  # ~2 waves of an H100's 132 SMs: the split heuristics aim at this many programs


def _alloc(shape, dtype, device):
    """Output allocation (uninitialised); tests replace it with a NaN fill to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


# -- kernels ------------------------------------------------------------------------------------
@triton.jit
def _norm_fn_fwd_kernel(
    x_ptr,          # residual x_flat (T, K), act dtype
    fn_ptr,         # fn (rows, K) fp32
    nw_ptr,         # norm_weight (K,) fp32 (unused unless HAS_NW)
    mixes_ptr,      # mixes (T, rows) fp32            -- SPLIT_K == 1
    rstd_ptr,       # rstd (T,) fp32                  -- SPLIT_K == 1
    part_dot_ptr,   # partial dots (SPLIT_K, T, rows) -- SPLIT_K > 1
    part_sq_ptr,    # partial sum of squares (SPLIT_K, T)
    T, K, rows, k_per_split, norm_eps,
    ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    HAS_NW: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), SPLIT_K). Reads x once: each element by exactly one program."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_r = tl.arange(0, ROWS_P)
    r_mask = offs_r < rows
    x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * K
    fn_rows = fn_ptr + offs_r[:, None] * K

    dots = tl.zeros((BLOCK_T, ROWS_P), dtype=tl.float32)   # sum_q x_flat[t, q] * fn_eff[r, q]
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)         # sum_q x_flat[t, q]^2
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        fn_eff = tl.load(fn_rows + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
        if HAS_NW:
            fn_eff = fn_eff * tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0)[None, :]
        dots = tl.dot(x, tl.trans(fn_eff), dots, input_precision=PRECISION)
        sumsq += tl.sum(x * x, axis=1)

    if SPLIT_K == 1:
        rstd = tl.math.rsqrt(sumsq / K + norm_eps)
        tl.store(mixes_ptr + offs_t[:, None] * rows + offs_r[None, :], dots * rstd[:, None],
                 mask=t_mask[:, None] & r_mask[None, :])
        tl.store(rstd_ptr + offs_t, rstd, mask=t_mask)
    else:
        tl.store(part_dot_ptr + (pid_k * T + offs_t)[:, None] * rows + offs_r[None, :], dots,
                 mask=t_mask[:, None] & r_mask[None, :])
        tl.store(part_sq_ptr + pid_k * T + offs_t, sumsq, mask=t_mask)


@triton.jit
def _finalize_tile(
    part_dot_ptr,   # (SPLIT_K, T, rows) fp32
    part_sq_ptr,    # (SPLIT_K, T) fp32
    mixes_ptr,      # (T, rows) fp32
    rstd_ptr,       # (T,) fp32
    offs_t,         # (BLOCK_T,) the tokens of this tile
    T, K, rows, norm_eps,
    ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The split reduction of the tokens ``offs_t``: adds the K splits in order 0..SPLIT_K-1, then
    mixes = dots * rstd. The one body of :func:`_norm_fn_finalize_kernel` and of the single-pass module's
    boundary tail (bit-identical results)."""
    t_mask = offs_t < T
    offs_r = tl.arange(0, ROWS_P)
    mask = t_mask[:, None] & (offs_r < rows)[None, :]
    dots = tl.zeros((BLOCK_T, ROWS_P), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        dots += tl.load(part_dot_ptr + (s * T + offs_t)[:, None] * rows + offs_r[None, :], mask=mask, other=0.0)
        sumsq += tl.load(part_sq_ptr + s * T + offs_t, mask=t_mask, other=0.0)
    rstd = tl.math.rsqrt(sumsq / K + norm_eps)
    tl.store(mixes_ptr + offs_t[:, None] * rows + offs_r[None, :], dots * rstd[:, None], mask=mask)
    tl.store(rstd_ptr + offs_t, rstd, mask=t_mask)


@triton.jit
def _norm_fn_finalize_kernel(
    part_dot_ptr,   # (SPLIT_K, T, rows) fp32
    part_sq_ptr,    # (SPLIT_K, T) fp32
    mixes_ptr,      # (T, rows) fp32
    rstd_ptr,       # (T,) fp32
    T, K, rows, norm_eps,
    ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): :func:`_finalize_tile` of BLOCK_T tokens."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _finalize_tile(part_dot_ptr, part_sq_ptr, mixes_ptr, rstd_ptr, offs_t, T, K, rows, norm_eps,
                   ROWS_P=ROWS_P, BLOCK_T=BLOCK_T, SPLIT_K=SPLIT_K)


@triton.jit
def _norm_fn_bwd_kernel(
    g_ptr,          # grad_mixes (T, rows) fp32
    x_ptr,          # residual (T, n, C), act dtype
    fn_ptr,         # fn (rows, K) fp32
    nw_ptr,         # norm_weight (K,) fp32          (HAS_NW)
    mixes_ptr,      # mixes (T, rows) fp32
    rstd_ptr,       # rstd (T,) fp32
    gres_ptr,       # grad_residual (T, n, C), act   (HAS_GRAD_RES)
    ag_ptr,         # apply_grad (T, C), act         (HAS_APPLY)
    pre_ptr,        # apply_w (T, n) fp32            (HAS_APPLY)
    dx_ptr,         # d_residual (T, n, C), act
    part_dfn_ptr,   # partial d_fn_eff (SPLIT_T, rows, K) fp32
    T, n, C, rows, n_c_blocks, t_per_split,
    ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_NW: tl.constexpr, HAS_GRAD_RES: tl.constexpr, HAS_APPLY: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (n * cdiv(C, BLOCK_C), SPLIT_T). Program (kb, s): stream i = kb // n_c_blocks, channels
    c0 .. c0+BLOCK_C of it, tokens [s * t_per_split, (s+1) * t_per_split). Reads x once."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    K = n * C
    i = pid_k // n_c_blocks
    offs_c = (pid_k % n_c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_q = i * C + offs_c                  # columns of x_flat / fn
    offs_r = tl.arange(0, ROWS_P)
    r_mask = offs_r < rows

    fn_eff = tl.load(fn_ptr + offs_r[:, None] * K + offs_q[None, :], mask=r_mask[:, None] & c_mask[None, :],
                     other=0.0)
    if HAS_NW:
        fn_eff = fn_eff * tl.load(nw_ptr + offs_q, mask=c_mask, other=0.0)[None, :]
    d_fn = tl.zeros((ROWS_P, BLOCK_C), dtype=tl.float32)

    t_start = pid_s * t_per_split
    t_end = tl.minimum(t_start + t_per_split, T)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < t_end
        tr_mask = t_mask[:, None] & r_mask[None, :]
        tc_mask = t_mask[:, None] & c_mask[None, :]
        g = tl.load(g_ptr + offs_t[:, None] * rows + offs_r[None, :], mask=tr_mask, other=0.0)
        mixes = tl.load(mixes_ptr + offs_t[:, None] * rows + offs_r[None, :], mask=tr_mask, other=0.0)
        rstd = tl.load(rstd_ptr + offs_t, mask=t_mask, other=0.0)
        coef = rstd * rstd / K * tl.sum(g * mixes, axis=1)     # (rstd^2 / K) * (g . mixes)
        g_r = g * rstd[:, None]
        x_offs = offs_t.to(tl.int64)[:, None] * K + offs_q[None, :]
        x = tl.load(x_ptr + x_offs, mask=tc_mask, other=0.0).to(tl.float32)

        d_x = tl.dot(g_r, fn_eff, input_precision=PRECISION) - coef[:, None] * x
        if HAS_GRAD_RES:
            d_x += tl.load(gres_ptr + x_offs, mask=tc_mask, other=0.0).to(tl.float32)
        if HAS_APPLY:
            pre_i = tl.load(pre_ptr + offs_t * n + i, mask=t_mask, other=0.0)
            ag = tl.load(ag_ptr + offs_t.to(tl.int64)[:, None] * C + offs_c[None, :], mask=tc_mask, other=0.0)
            d_x += pre_i[:, None] * ag.to(tl.float32)
        tl.store(dx_ptr + x_offs, d_x.to(dx_ptr.dtype.element_ty), mask=tc_mask)
        d_fn = tl.dot(tl.trans(g_r), x, d_fn, input_precision=PRECISION)

    tl.store(part_dfn_ptr + (pid_s * rows + offs_r)[:, None].to(tl.int64) * K + offs_q[None, :], d_fn,
             mask=r_mask[:, None] & c_mask[None, :])


# -- configs ------------------------------------------------------------------------------------
def _rows(call) -> int:
    rows = getattr(call, "rows", None)
    return rows if rows is not None else mix_count(call.n)


def _is_cpu(call) -> bool:
    dev = getattr(call, "device", None)
    return dev is not None and torch.device(dev).type == "cpu"


def norm_fn_config_space(call) -> list[dict]:
    """Tunables of the forward: ``block_T`` tokens x ``block_K`` columns of x_flat per loop step,
    ``split_K`` K splits (1 = no second kernel), ``num_warps``, ``num_stages``, ``precision``."""
    K = call.n * call.C
    grid = itertools.product((16, 32, 64), (16, 32, 64), (1, 2, 4, 8, 16), (4, 8), (2, 3), PRECISIONS)
    return [dict(block_T=bt, block_K=bk, split_K=sp, num_warps=w, num_stages=stages, precision=p)
            for bt, bk, sp, w, stages, p in grid if sp == 1 or sp * bk <= K]


def norm_fn_default_config(call) -> dict:
    """Heuristic: 64-token blocks (32 for n = 8), 32-column K steps, and enough K splits to launch
    ~2 waves of programs when T is small. On CPU (Triton's interpreter, where each program costs
    tens of ms) one large program per 64 tokens and no split."""
    K = call.n * call.C
    if _is_cpu(call):
        return dict(block_T=64, block_K=min(256, max(16, common.next_pow2(K))), split_K=1, num_warps=4,
                    num_stages=1, precision="tf32x3")
    # tf32x3 dots hold hi/lo copies of both operands in registers: these tiles are the largest that
    # assemble without spills for sm_80/90/100 (checked with ptxas in the tests' AOT check)
    rows_p = max(16, common.next_pow2(_rows(call)))
    block_T, block_K = (64, 32) if rows_p <= 32 else (32, 32)
    t_blocks = max(1, triton.cdiv(call.T, block_T))
    split_K = 1
    if t_blocks < _TARGET_PROGRAMS:
        # at least 4 K steps per split, at most 16 splits
        split_K = max(1, min(16, prev_pow2(triton.cdiv(_TARGET_PROGRAMS, t_blocks)),
                             prev_pow2(max(1, K // (4 * block_K)))))
    return dict(block_T=block_T, block_K=block_K, split_K=split_K, num_warps=8, num_stages=3 if rows_p <= 32 else 2,
                precision="tf32x3")


def norm_fn_bwd_config_space(call) -> list[dict]:
    """Tunables of the backward: ``block_T`` tokens per loop step, ``block_C`` channels of one stream
    per program, ``split_T`` token ranges (partials of d_fn_eff), ``num_warps``, ``num_stages``, ``precision``."""
    grid = itertools.product((16, 32, 64), (16, 32, 64), (1, 2, 4, 8, 16, 32), (4, 8), (1, 2), PRECISIONS)
    return [dict(block_T=bt, block_C=bc, split_T=sp, num_warps=w, num_stages=stages, precision=p)
            for bt, bc, sp, w, stages, p in grid]


def norm_fn_bwd_default_config(call) -> dict:
    """Heuristic: ~2 waves of (channel block, token range) programs, spill-free tiles (n = 8 pads rows
    to 128 and gets smaller ones). On CPU: few, large programs."""
    rows_p = max(16, common.next_pow2(_rows(call)))
    if _is_cpu(call):
        return dict(block_T=64, block_C=min(128, max(16, common.next_pow2(call.C))), split_T=1, num_warps=4,
                    num_stages=1, precision="tf32x3")
    # n = 8 (rows padded to 128): tf32x3 operand copies spill on sm_80/100 at any tile that fills
    # the MMA, so it takes float32 FMA dots ("ieee") instead
    block_T, block_C, num_warps, num_stages, precision = (
        (32, 64, 8, 2, "tf32x3") if rows_p <= 32 else (16, 32, 8, 2, "ieee"))
    k_programs = call.n * triton.cdiv(call.C, block_C)
    t_blocks = max(1, triton.cdiv(call.T, block_T))
    split_T = max(1, min(32, t_blocks, prev_pow2(max(1, _TARGET_PROGRAMS // k_programs))))
    return dict(block_T=block_T, block_C=block_C, split_T=split_T, num_warps=num_warps, num_stages=num_stages,
                precision=precision)


_FWD_KEYS = ("block_T", "block_K", "split_K", "num_warps", "num_stages", "precision")
_BWD_KEYS = ("block_T", "block_C", "split_T", "num_warps", "num_stages", "precision")


def config_space(op: str, call) -> list[dict]:
    return {"norm_fn": norm_fn_config_space, "norm_fn_bwd": norm_fn_bwd_config_space}[op](call)


def default_config(op: str, call) -> dict:
    return {"norm_fn": norm_fn_default_config, "norm_fn_bwd": norm_fn_bwd_default_config}[op](call)


def _check_config(op: str, cfg: dict, keys, dot_dims, splits) -> dict:
    """Reject a config that would compile to a wrong or invalid kernel, with a message that says why."""
    missing = [k for k in keys if k not in cfg]
    unknown = [k for k in cfg if k not in keys]
    if missing or unknown:
        raise ValueError(f"triton {op}: config {cfg} must have exactly the keys {list(keys)} "
                         f"(missing {missing}, unknown {unknown})")
    for k in dot_dims:
        v = cfg[k]
        if not isinstance(v, int) or v < 16 or v & (v - 1):
            raise ValueError(f"triton {op}: config[{k!r}] must be a power of two >= 16 (a tl.dot dimension); got {v!r}")
    for k in splits:
        if not isinstance(cfg[k], int) or cfg[k] < 1:
            raise ValueError(f"triton {op}: config[{k!r}] must be an int >= 1; got {cfg[k]!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"triton {op}: config['num_warps'] must be 1, 2, 4, 8 or 16; got {cfg['num_warps']!r}")
    if not isinstance(cfg["num_stages"], int) or cfg["num_stages"] < 1:
        raise ValueError(f"triton {op}: config['num_stages'] must be an int >= 1; got {cfg['num_stages']!r}")
    if cfg["precision"] not in PRECISIONS:
        raise ValueError(f"triton {op}: config['precision'] must be one of {PRECISIONS} (float32-accurate dots); "
                         f"got {cfg['precision']!r}")
    return cfg


# -- wrappers -----------------------------------------------------------------------------------
def norm_fn_fwd(residual, fn, norm_weight, norm_eps, *, config: dict):
    """contract §2 -> (mixes (T, rows) fp32, rstd (T,) fp32).

    residual (T, n, C) bf16/fp16/fp32 contiguous; fn (rows, K) fp32; norm_weight (K,) fp32 or None.
    Bytes moved (specs.SPECS["norm_fn"].bytes): T*K*itemsize + rows*K*4 (+ K*4) + T*(rows+1)*4;
    with split_K > 1 the partial buffer adds 2*split_K*T*(rows+1)*4. The residual is read once.
    """
    T = residual.shape[0]
    rows, K = fn.shape
    p = project(residual, fn, norm_weight, norm_eps, config=config)
    if p.split_K > 1 and T > 0:
        _norm_fn_finalize_kernel[(triton.cdiv(T, p.block_T),)](
            p.part_dot, p.part_sq, p.mixes, p.rstd, T, K, rows, float(norm_eps),
            ROWS_P=p.rows_p, BLOCK_T=p.block_T, SPLIT_K=p.split_K, num_warps=4)
    return p.mixes, p.rstd


def project(residual, fn, norm_weight, norm_eps, *, config: dict) -> SimpleNamespace:
    """norm_fn's main loop alone (one launch; none at T = 0) -> namespace of ``mixes``, ``rstd`` (written when
    ``split_K == 1``, else still to be formed from the partials), ``part_dot (split_K, T, rows)``,
    ``part_sq (split_K, T)`` (written when ``split_K > 1``), the split count actually used, ``block_T`` and
    ``rows_p``. :func:`norm_fn_fwd` adds the finalize kernel; the Triton ``mhc_pre`` its boundary tail."""
    T, n, C = residual.shape
    rows, K = fn.shape
    mixes = _alloc((T, rows), torch.float32, residual.device)
    rstd = _alloc((T,), torch.float32, residual.device)
    cfg = _check_config("norm_fn", config, _FWD_KEYS, ("block_T", "block_K"), ("split_K",))
    block_T, block_K = cfg["block_T"], cfg["block_K"]
    split_K = max(1, min(cfg["split_K"], triton.cdiv(K, block_K)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_K), block_K) * block_K
    split_K = triton.cdiv(K, k_per_split)  # no empty split
    rows_p = max(16, common.next_pow2(rows))
    if split_K > 1:
        part_dot = torch.empty((split_K, T, rows), dtype=torch.float32, device=residual.device)
        part_sq = torch.empty((split_K, T), dtype=torch.float32, device=residual.device)
    else:
        part_dot = part_sq = mixes
    out = SimpleNamespace(mixes=mixes, rstd=rstd, part_dot=part_dot, part_sq=part_sq, split_K=split_K,
                          block_T=block_T, rows_p=rows_p)
    if T == 0:
        return out
    nw = norm_weight if norm_weight is not None else fn
    grid = (triton.cdiv(T, block_T), split_K)
    _norm_fn_fwd_kernel[grid](
        residual, fn, nw, mixes, rstd, part_dot, part_sq, T, K, rows, k_per_split, float(norm_eps),
        ROWS_P=rows_p, BLOCK_T=block_T, BLOCK_K=block_K, SPLIT_K=split_K, HAS_NW=norm_weight is not None,
        PRECISION=cfg["precision"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def norm_fn_bwd(grad_mixes, residual, fn, norm_weight, mixes, rstd, *, config: dict, apply_w=None, apply_grad=None,
                grad_residual=None):
    """contract §9 -> (d_residual (T, n, C) residual dtype, d_fn_eff (rows, K) fp32).

    grad_mixes, mixes (T, rows) fp32; rstd (T,) fp32; residual (T, n, C); fn (rows, K) fp32;
    norm_weight (K,) fp32 or None. Optional, for a whole site's pre side: grad_residual (T, n, C)
    residual dtype, and apply_grad (T, C) residual dtype with apply_w (T, n) fp32 (both or neither);
    d_residual then also holds grad_residual + apply_w (x) apply_grad, rounded once.
    d_fn_eff is the gradient of fn * norm_weight (d_fn = d_fn_eff * norm_weight, d_norm_weight =
    sum_r d_fn_eff * fn, left to the caller: they are (rows, K)-sized).
    Bytes moved (specs.SPECS["norm_fn_bwd"].bytes): 2*T*K*itemsize + T*(2*rows+1)*4 + 2*rows*K*4
    (+ T*K*itemsize for grad_residual, + T*(C*itemsize + n*4) for the collapse gradient), plus
    split_T*rows*K*4 written and read for the d_fn_eff partials. The residual is read once.
    """
    T, n, C = residual.shape
    rows, K = fn.shape
    if (apply_grad is None) != (apply_w is None):
        raise ValueError("triton norm_fn_bwd: apply_grad and apply_w must be given together")
    d_x = _alloc((T, n, C), residual.dtype, residual.device)
    if T == 0:
        return d_x, torch.zeros((rows, K), dtype=torch.float32, device=residual.device)
    cfg = _check_config("norm_fn_bwd", config, _BWD_KEYS, ("block_T", "block_C"), ("split_T",))
    block_T, block_C = cfg["block_T"], cfg["block_C"]
    split_T = max(1, min(cfg["split_T"], triton.cdiv(T, block_T)))
    t_per_split = triton.cdiv(triton.cdiv(T, split_T), block_T) * block_T
    split_T = triton.cdiv(T, t_per_split)  # no empty token range
    n_c_blocks = triton.cdiv(C, block_C)
    part = _alloc((split_T, rows, K), torch.float32, residual.device)
    _norm_fn_bwd_kernel[(n * n_c_blocks, split_T)](
        grad_mixes, residual, fn, norm_weight if norm_weight is not None else fn, mixes, rstd,
        grad_residual if grad_residual is not None else residual,
        apply_grad if apply_grad is not None else residual,
        apply_w if apply_w is not None else rstd,
        d_x, part, T, n, C, rows, n_c_blocks, t_per_split,
        ROWS_P=max(16, common.next_pow2(rows)), BLOCK_T=block_T, BLOCK_C=block_C,
        HAS_NW=norm_weight is not None, HAS_GRAD_RES=grad_residual is not None, HAS_APPLY=apply_grad is not None,
        PRECISION=cfg["precision"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    d_fn = part[0] if split_T == 1 else torch.sum(part, dim=0)
    return d_x, d_fn


# -- ahead-of-time specs ----------------------------------------------------------------------------
_TY = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def aot_specs(n: int, C: int, dtype: torch.dtype, T: int = 4096) -> list[common.AotSpec]:
    """The kernels of this module at their default GPU configs for a (T=4096, n, C, dtype) call:
    forward (and the split-K finalize kernel when the default splits), backward plain and with
    every fused extra (grad_residual, apply_grad/apply_w) and norm_weight."""
    act = _TY[dtype]
    rows = n * (n + 2)
    rows_p = max(16, common.next_pow2(rows))
    call = SimpleNamespace(T=T, n=n, C=C, rows=rows, dtype=dtype, device=torch.device("cuda"))
    specs = []

    f = norm_fn_default_config(call)
    sig = {"x_ptr": act, "fn_ptr": "*fp32", "nw_ptr": "*fp32", "mixes_ptr": "*fp32", "rstd_ptr": "*fp32",
           "part_dot_ptr": "*fp32", "part_sq_ptr": "*fp32", "T": "i32", "K": "i32", "rows": "i32",
           "k_per_split": "i32", "norm_eps": "fp32", "ROWS_P": "constexpr", "BLOCK_T": "constexpr",
           "BLOCK_K": "constexpr", "SPLIT_K": "constexpr", "HAS_NW": "constexpr", "PRECISION": "constexpr"}
    for has_nw in (False, True):
        specs.append(common.AotSpec(
            "norm_fn_fwd" + ("_nw" if has_nw else ""), _norm_fn_fwd_kernel, dict(sig),
            dict(ROWS_P=rows_p, BLOCK_T=f["block_T"], BLOCK_K=f["block_K"], SPLIT_K=f["split_K"], HAS_NW=has_nw,
                 PRECISION=f["precision"]),
            num_warps=f["num_warps"], num_stages=f["num_stages"], config=f))
    specs.append(common.AotSpec(
        "norm_fn_finalize", _norm_fn_finalize_kernel,
        {"part_dot_ptr": "*fp32", "part_sq_ptr": "*fp32", "mixes_ptr": "*fp32", "rstd_ptr": "*fp32", "T": "i32",
         "K": "i32", "rows": "i32", "norm_eps": "fp32", "ROWS_P": "constexpr", "BLOCK_T": "constexpr",
         "SPLIT_K": "constexpr"},
        dict(ROWS_P=rows_p, BLOCK_T=f["block_T"], SPLIT_K=max(2, f["split_K"])), num_warps=4, num_stages=1,
        config=dict(block_T=f["block_T"], split_K=max(2, f["split_K"]))))

    b = norm_fn_bwd_default_config(call)
    sig = {"g_ptr": "*fp32", "x_ptr": act, "fn_ptr": "*fp32", "nw_ptr": "*fp32", "mixes_ptr": "*fp32",
           "rstd_ptr": "*fp32", "gres_ptr": act, "ag_ptr": act, "pre_ptr": "*fp32", "dx_ptr": act,
           "part_dfn_ptr": "*fp32", "T": "i32", "n": "i32", "C": "i32", "rows": "i32", "n_c_blocks": "i32",
           "t_per_split": "i32", "ROWS_P": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr",
           "HAS_NW": "constexpr", "HAS_GRAD_RES": "constexpr", "HAS_APPLY": "constexpr", "PRECISION": "constexpr"}
    for fused in (False, True):
        specs.append(common.AotSpec(
            "norm_fn_bwd" + ("_site" if fused else ""), _norm_fn_bwd_kernel, dict(sig),
            dict(ROWS_P=rows_p, BLOCK_T=b["block_T"], BLOCK_C=b["block_C"], HAS_NW=fused, HAS_GRAD_RES=fused,
                 HAS_APPLY=fused, PRECISION=b["precision"]),
            num_warps=b["num_warps"], num_stages=b["num_stages"], config=b))
    return specs
