"""Triton kernels of the forward boundaries, each two launches at every T (no fill, copy or cast beside
them, so a decode step is two kernels and CUDA-graph safe): single-pass mHC's ``mhc_pre_sp`` and
``post_pre_sp`` (contract §14) with the residual read once, and the two-pass ``mhc_pre`` (§6) and
``post_pre`` (§8).

Notation as in the contract: ``x`` the residual ``(T, n, C)``, ``w`` the carried pre ``(T, n)`` float32
(``prev_pre``; absent at the first site, whose collapse is stream 0), ``fn_eff = fn * norm_weight``
``(m, n*C)`` float32, ``u = round(sum_i w_i x_i)`` the layer input before the optional out-norm (in normal
mode ``w`` is this site's pre).

Launch 1, the main loop:

* :func:`_sp_project_kernel` (``mhc_pre_sp``, ``post_pre_sp``, ``post_pre``) -- grid
  ``(cdiv(T, BLOCK_T), split_K)``, a program owns ``BLOCK_T`` tokens and one range of columns of *all* ``n``
  streams. Per step it loads the ``(BLOCK_T, n, BLOCK_C)`` block of the residual once (with ``HAS_POST``:
  ``y`` and the ``n`` residual rows, and forms and stores the new residual
  ``s_i = round(post_i y + sum_j comb[j, i] x_j)`` instead), and from those values

  * the projection partials ``sum_k s[t, k] fn_eff[r, k]`` (``tl.dot``, float32-accurate precision) and
    ``sum_k s[t, k]^2``;
  * with ``COLLAPSE`` (single-pass): the collapse ``u = round(sum_i w_i s_i)`` (at the first site ``u = s_0``
    bit for bit, picked from the bits), stored once, and the partial ``sum_c u[t, c]^2`` of the rounded ``u``
    (the out-norm's statistic). ``post_pre``'s collapse needs this site's pre, which only exists after the
    projection: its main loop is post + projection.

* ``mhc_pre``: norm_fn's own main loop (:func:`~.norm_fn.project`), so its mixes are ``norm_fn``'s bit for bit.

Launch 2, :func:`_boundary_tail_kernel` -- grid ``(cdiv(T, BLOCK_T),)``, a program owns ``BLOCK_T`` tokens: the
split reduction (the finalize kernel's body, :func:`~.norm_fn._finalize_tile`: splits added in order, mixes,
rstd), split_mixes (the split_mixes kernel's body, :func:`~.sinkhorn._split_mixes_tile`: pre, post, comb);
in normal mode the collapse with this pre from the stored residual (``pre_apply_mix``'s arithmetic, walking C);
with an out-norm weight the layer input rewritten in place as ``round(u * rho * w)``,
``rho = rsqrt(sum u^2 / C + eps)`` (single-pass: the sum from the main loop's partials, in split order; normal
mode: ``collapse_norm_fwd_kernel``'s), and ``out_rstd`` (rho, or 1 without a weight). The weight is read in
its own dtype and widened in the kernel. The tail's arithmetic is the unfused chain's, written once (the same
``@triton.jit`` helpers), so the single-pass outputs are those of the former four-launch path bit for bit and
``mhc_pre``'s are the chain's (norm_fn -> split_mixes -> pre_apply_mix / collapse_norm) at the same projection
config.

Traffic per token (elements of the residual dtype): ``mhc_pre_sp`` reads the residual once and writes the
layer input once, ``(n + 1) * C``; ``post_pre_sp`` reads ``y`` and the residual once and writes the new
residual and the layer input once, ``(2n + 2) * C`` (the spec's floors); ``mhc_pre`` reads the residual twice
and writes the layer input, ``(2n + 1) * C``; ``post_pre`` reads ``y`` and the residual, writes the new
residual, reads it back and writes the layer input, ``(3n + 2) * C``. The out-norm adds ``2 * C`` (its
statistic needs every column of a token before the first normalised value: the layer input is re-read, from
cache in normal mode, and rewritten). Partials: ``split_K * (m + 2)`` floats per token (``m + 1`` without the
collapse). The FP8 copy (``fp8_group``) adds ``C`` code bytes and ``4 * C / group`` scale bytes written per
token, quantised from the registers of the tail's last loop over the layer input; single-pass without the
out-norm has no such loop, so its tail reads the layer input back (``C`` elements). The fused main loop's
summation order differs from norm_fn's (the dot runs over column blocks of
all streams; ``tl.sum`` over the streams), so single-pass and ``post_pre`` results agree with the two-pass
chain's projection to float32 accumulation error, not bit for bit; ``post_pre``'s new residual is ``post``'s
bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from mhc_kernels.specs import fp8_scale_dtype, mix_count

from . import common, norm_fn
from .fp8 import quantize_groups, scale_ptr
from .norm_fn import _finalize_tile
from .sinkhorn import _split_mixes_tile

_BITS = {torch.bfloat16: tl.int16, torch.float16: tl.int16, torch.float32: tl.int32}


@triton.jit
def _sp_project_kernel(
    y_ptr,          # layer_output (T, C) act            (HAS_POST)
    x_ptr,          # residual (T, n, C) act
    post_ptr,       # post_mix (T, n) fp32               (HAS_POST)
    comb_ptr,       # comb_mix (T, n, n) fp32            (HAS_POST)
    w_ptr,          # prev_pre (T, n) fp32               (not FIRST)
    fn_ptr,         # fn (rows, n*C) fp32
    nw_ptr,         # norm_weight (n*C,) fp32            (HAS_NW)
    out_ptr,        # new residual (T, n, C) act         (HAS_POST)
    u_ptr,          # layer input (T, C) act: the rounded collapse
    part_dot_ptr,   # (split_K, T, rows) fp32
    part_sq_ptr,    # (split_K, T) fp32
    part_usq_ptr,   # (split_K, T) fp32
    T, C, rows, c_per_split,
    N: tl.constexpr, ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_POST: tl.constexpr, COLLAPSE: tl.constexpr, FIRST: tl.constexpr, HAS_NW: tl.constexpr,
    BITS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), split_K). Every residual (and y) element is loaded by exactly one program, once.
    Without ``COLLAPSE`` (``post_pre``: post + projection) no layer input and no ``part_usq`` are written."""
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, N)
    r = tl.arange(0, ROWS_P)
    t_ok = t < T
    r_ok = r < rows
    ti_ok = t_ok[:, None] & (i < N)[None, :]
    t64 = t.to(tl.int64)
    K = N * C
    stream_row = (t64[:, None] * N + i[None, :]) * C        # (BLOCK_T, N): offset of x[t, i, 0]
    dots = tl.zeros((BLOCK_T, ROWS_P), dtype=tl.float32)    # sum_k s[t, k] * fn_eff[r, k]
    sumsq = tl.zeros((BLOCK_T,), dtype=tl.float32)          # sum_k s[t, k]^2
    usq = tl.zeros((BLOCK_T,), dtype=tl.float32)            # sum_c u[t, c]^2 of the rounded u
    if COLLAPSE:
        if not FIRST:
            w = tl.load(w_ptr + t64[:, None] * N + i[None, :], mask=ti_ok, other=0.0)
    if HAS_POST:
        p = tl.load(post_ptr + t64[:, None] * N + i[None, :], mask=ti_ok, other=0.0)
    c_start = pid_s * c_per_split
    c_end = tl.minimum(C, c_start + c_per_split)
    for c0 in range(c_start, c_end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_end
        tc_ok = t_ok[:, None] & c_ok[None, :]
        m3 = ti_ok[:, :, None] & c_ok[None, None, :]
        offs3 = stream_row[:, :, None] + c[None, None, :]
        if HAS_POST:
            # s_i = round(post_i y + sum_j comb[j, i] x_j): y and every residual row loaded once
            y = tl.load(y_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0).to(tl.float32)
            acc = p[:, :, None] * y[:, None, :]
            for j in tl.static_range(N):
                cw = tl.load(comb_ptr + t64[:, None] * (N * N) + j * N + i[None, :], mask=ti_ok, other=0.0)
                xj = tl.load(x_ptr + (t64 * N + j)[:, None] * C + c[None, :], mask=tc_ok, other=0.0)
                acc += cw[:, :, None] * xj.to(tl.float32)[:, None, :]
            s = acc.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + offs3, s, mask=m3)
        else:
            s = tl.load(x_ptr + offs3, mask=m3, other=0.0)
        sf = s.to(tl.float32)
        # the projection of the stored values, all n streams of this column block in one dot
        f_offs = r[:, None, None] * K + (i * C)[None, :, None] + c[None, None, :]
        f = tl.load(fn_ptr + f_offs, mask=r_ok[:, None, None] & c_ok[None, None, :], other=0.0)
        if HAS_NW:
            f = f * tl.load(nw_ptr + (i * C)[:, None] + c[None, :], mask=c_ok[None, :], other=0.0)[None, :, :]
        dots = tl.dot(tl.reshape(sf, (BLOCK_T, N * BLOCK_C)), tl.trans(tl.reshape(f, (ROWS_P, N * BLOCK_C))), dots,
                      input_precision=PRECISION)
        sumsq += tl.sum(tl.sum(sf * sf, axis=2), axis=1)
        if COLLAPSE:
            # the collapse, rounded once and stored once
            if FIRST:
                bits = tl.where((i == 0)[None, :, None], s.to(BITS, bitcast=True), 0)
                u = tl.sum(bits, axis=1).to(BITS).to(u_ptr.dtype.element_ty, bitcast=True)
            else:
                u = tl.sum(w[:, :, None] * sf, axis=1).to(u_ptr.dtype.element_ty)
            tl.store(u_ptr + t64[:, None] * C + c[None, :], u, mask=tc_ok)
            uf = u.to(tl.float32)
            usq += tl.sum(uf * uf, axis=1)
    part = pid_s * T + t
    tl.store(part_dot_ptr + part[:, None] * rows + r[None, :], dots, mask=t_ok[:, None] & r_ok[None, :])
    tl.store(part_sq_ptr + part, sumsq, mask=t_ok)
    if COLLAPSE:
        tl.store(part_usq_ptr + part, usq, mask=t_ok)


@triton.jit
def _boundary_tail_kernel(
    part_dot_ptr,   # (SPLIT_K, T, rows) fp32            (SPLIT_K > 0)
    part_sq_ptr,    # (SPLIT_K, T) fp32                  (SPLIT_K > 0)
    part_usq_ptr,   # (SPLIT_K, T) fp32                  (HAS_ONW and not COLLAPSE)
    scale_ptr,      # (3,) fp32
    base_ptr,       # (rows,) fp32
    x_ptr,          # residual (T, n, C) act: the collapse's input (COLLAPSE)
    onw_ptr,        # out_norm_weight (C,) fp32 or act   (HAS_ONW)
    mixes_ptr,      # (T, rows) fp32: written (SPLIT_K > 0), else read
    rstd_ptr,       # (T,) fp32: written (SPLIT_K > 0)
    pre_ptr,        # (T, n) fp32, written
    post_ptr,       # (T, n) fp32, written
    comb_ptr,       # (T, n, n) fp32, written
    u_ptr,          # layer input (T, C) act: written (COLLAPSE), normalised in place (HAS_ONW)
    out_rstd_ptr,   # (T,) fp32, written
    codes_ptr,      # (T, C) u8: the FP8 codes of the layer input (FP8_GROUP > 0), written
    fp8_scales_ptr,  # (T, C / FP8_GROUP) fp32, or u8 E8M0 bytes at FP8_GROUP 32 (FP8_GROUP > 0), written
    T, C, rows, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps,
    N: tl.constexpr, ROWS_P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, SPLIT_K: tl.constexpr,
    COLLAPSE: tl.constexpr, HAS_ONW: tl.constexpr, FP8_GROUP: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): everything after the projection's main loop for BLOCK_T tokens.

    1. ``SPLIT_K > 0``: the split reduction (:func:`~.norm_fn._finalize_tile`, the finalize kernel's body):
       mixes, rstd. A barrier: the program's own stores are visible to all its threads.
    2. split_mixes (:func:`~.sinkhorn._split_mixes_tile`, the split_mixes kernel's body): pre, post, comb.
    3. ``COLLAPSE`` (``mhc_pre`` / ``post_pre``): after a barrier, u = round(sum_i pre_i x_i) walking C in
       BLOCK_C steps (pre_apply_mix's arithmetic) and with ``HAS_ONW`` the sum of u^2 of the rounded u
       (collapse_norm's); else (single-pass) u was stored by the main loop and the sum of u^2 is its
       partials', added in split order.
    4. ``HAS_ONW``: rho = rsqrt(sum / C + out_norm_eps); u <- round(u * rho * w) in place (after a barrier
       when this program wrote u); out_rstd = rho, else 1.
    5. ``FP8_GROUP > 0`` (``BLOCK_C`` a multiple of it): the FP8 copy of the layer input's final values
       (:func:`~.fp8.quantize_groups`, the ``quantize_fp8`` kernel's arithmetic) from the registers of the loop
       that stores them (step 4, or step 3 without the norm); single-pass without the norm stores no layer
       input here, so it is read back (``2 * C`` bytes per token) and quantised in a loop of its own.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    if SPLIT_K > 0:
        _finalize_tile(part_dot_ptr, part_sq_ptr, mixes_ptr, rstd_ptr, t, T, N * C, rows, norm_eps,
                       ROWS_P=ROWS_P, BLOCK_T=BLOCK_T, SPLIT_K=SPLIT_K)
        tl.debug_barrier()
    _split_mixes_tile(mixes_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, t, t_ok, pre_eps, post_mult,
                      iters, sinkhorn_eps, N=N)
    rho = tl.full((BLOCK_T,), 1.0, tl.float32)
    if COLLAPSE:
        tl.debug_barrier()
        ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            tc_ok = t_ok[:, None] & (c < C)[None, :]
            x_row = x_ptr + (t64 * N)[:, None] * C + c[None, :]  # stream 0 of each token
            acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
            for i in tl.static_range(N):
                w = tl.load(pre_ptr + t64 * N + i, mask=t_ok, other=0.0)
                x = tl.load(x_row + i * C, mask=tc_ok, other=0.0)
                acc += w[:, None] * x.to(tl.float32)
            u = acc.to(u_ptr.dtype.element_ty)
            tl.store(u_ptr + t64[:, None] * C + c[None, :], u, mask=tc_ok)
            if HAS_ONW:
                uf = u.to(tl.float32)
                ss += tl.sum(uf * uf, axis=1)
            elif FP8_GROUP > 0:
                _store_fp8(u, codes_ptr, fp8_scales_ptr, t64, t_ok, c0, C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                           GROUP=FP8_GROUP)
        if HAS_ONW:
            rho = tl.math.rsqrt(ss / C + out_norm_eps)
            tl.debug_barrier()
    elif HAS_ONW:
        ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            ss += tl.load(part_usq_ptr + s * T + t, mask=t_ok, other=0.0)
        rho = tl.math.rsqrt(ss / C + out_norm_eps)
    if HAS_ONW:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            tc_ok = t_ok[:, None] & (c < C)[None, :]
            offs = t64[:, None] * C + c[None, :]
            u = tl.load(u_ptr + offs, mask=tc_ok, other=0.0).to(tl.float32)
            g = tl.load(onw_ptr + c, mask=c < C, other=0.0).to(tl.float32)
            v = (u * rho[:, None] * g[None, :]).to(u_ptr.dtype.element_ty)
            tl.store(u_ptr + offs, v, mask=tc_ok)
            if FP8_GROUP > 0:
                _store_fp8(v, codes_ptr, fp8_scales_ptr, t64, t_ok, c0, C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                           GROUP=FP8_GROUP)
    elif FP8_GROUP > 0:
        if not COLLAPSE:
            # single-pass without the norm: the main loop stored the layer input; read it back for the copy
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                tc_ok = t_ok[:, None] & (c < C)[None, :]
                u = tl.load(u_ptr + t64[:, None] * C + c[None, :], mask=tc_ok, other=0.0)
                _store_fp8(u, codes_ptr, fp8_scales_ptr, t64, t_ok, c0, C, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C,
                           GROUP=FP8_GROUP)
    tl.store(out_rstd_ptr + t, rho, mask=t_ok)


@triton.jit
def _store_fp8(v, codes_ptr, scales_ptr, t64, t_ok, c0, C,
               BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """The FP8 copy of one ``(BLOCK_T, BLOCK_C)`` tile of stored layer-input values ``v`` (columns ``c0 ..``;
    ``GROUP`` divides ``BLOCK_C`` and ``C``, so a group is wholly inside or wholly past ``C``): codes and one
    scale per group, as :func:`~.fp8.quantize_fp8_kernel` writes them."""
    NG: tl.constexpr = BLOCK_C // GROUP
    G = C // GROUP
    g = c0 // GROUP + tl.arange(0, NG)
    e = tl.arange(0, GROUP)
    ok = t_ok[:, None] & (g < G)[None, :]
    codes, scale = quantize_groups(tl.reshape(v.to(tl.float32), (BLOCK_T, NG, GROUP)), GROUP == 32)
    offs = t64[:, None, None] * C + (g[:, None] * GROUP + e[None, :])[None, :, :]
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=ok[:, :, None])
    tl.store(scales_ptr + t64[:, None] * G + g[None, :], scale, mask=ok)


# -- configs ----------------------------------------------------------------------------------------
def _on_cpu(call) -> bool:
    return getattr(call, "device", None) is not None and torch.device(call.device).type == "cpu"


OPS = ("mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp")
_PROJECTION_KEYS = ("block_T", "block_C", "split_K", "num_warps", "num_stages", "precision")
_TAIL_KEYS = ("block_T", "block_C", "num_warps", "num_stages")


def _projection_default(call, with_post: bool = False) -> dict:
    """norm_fn's tiling with its ``block_K`` staged elements per token cut into ``n`` streams of ``block_C``
    columns (at least 16 staged elements: a tl.dot dimension); post at n = 8 holds an (n x n) mix per token
    and all n output rows beside the dot's operands, so 16 tokens x 16 staged elements per step there (the
    largest tile ptxas assembles without spills with tf32x3 for sm_80/90/100)."""
    f = norm_fn.norm_fn_default_config(SimpleNamespace(T=call.T, n=call.n, C=call.C, rows=mix_count(call.n),
                                                       device=call.device))
    n = call.n
    narrow = with_post and n >= 8 and not _on_cpu(call)
    block_C = max(16 // n, (16 if narrow else f["block_K"]) // n, 1)
    c_blocks = triton.cdiv(call.C, block_C)
    block_T = 16 if narrow else f["block_T"]
    return dict(block_T=block_T, block_C=block_C, split_K=max(1, min(f["split_K"], c_blocks)),
                num_warps=f["num_warps"], num_stages=f["num_stages"], precision=f["precision"])


def _tail_default(call) -> dict:
    """The boundary tail: a few tokens per program walking all of C in 1024-column steps (collapse_norm's
    tile; independent of T, so batch invariant). On CPU (the interpreter) one program per 64 tokens."""
    block_C = min(1024, max(16, common.next_pow2(call.C)))
    block_T = 64 if _on_cpu(call) else max(1, min(4, 2048 // block_C))
    return dict(block_T=block_T, block_C=block_C, num_warps=4, num_stages=1)


def default_config(op: str, call) -> dict:
    """``{"projection": the main loop's tiling, "tail": the boundary tail's}``; the main loop of ``mhc_pre`` is
    norm_fn's (its config keys), of the other three the fused one (:data:`_PROJECTION_KEYS`)."""
    if op == "mhc_pre":
        proj = norm_fn.norm_fn_default_config(SimpleNamespace(T=call.T, n=call.n, C=call.C, rows=mix_count(call.n),
                                                              device=call.device))
    else:
        proj = _projection_default(call, with_post=op in ("post_pre", "post_pre_sp"))
    return {"projection": proj, "tail": _tail_default(call)}


def _tail_space(call) -> list[dict]:
    cmax = max(256, 2 * common.next_pow2(call.C))
    return [dict(block_T=bt, block_C=bc, num_warps=w, num_stages=1)
            for bt in (1, 2, 4, 8, 16, 32, 64) for bc in (256, 512, 1024, 2048) for w in (4, 8)
            if bc <= cmax and bt * bc <= 16384]


def config_space(op: str, call) -> list[dict]:
    """The default, then the projection's choices (``mhc_pre``: norm_fn's space; the others: block and split
    choices of the fused main loop) at the default tail, then the tail's tiles at the default projection."""
    d = default_config(op, call)
    out = [d]
    if op == "mhc_pre":
        projections = norm_fn.norm_fn_config_space(SimpleNamespace(T=call.T, n=call.n, C=call.C,
                                                                    rows=mix_count(call.n), device=call.device))
    else:
        n = call.n
        projections = []
        for bt in (16, 32, 64):
            for bc in sorted({max(16 // n, 1), max(32 // n, 1), max(64 // n, 1), 16}):
                for sp in (1, 2, 4, 8, 16):
                    if sp > 1 and sp * bc > call.C:
                        continue
                    projections.append(dict(d["projection"], block_T=bt, block_C=bc, split_K=sp))
    for cand in [dict(d, projection=p) for p in projections] + [dict(d, tail=t) for t in _tail_space(call)]:
        if cand not in out:
            out.append(cand)
    return out


def _pow2(op: str, part: str, cfg: dict, key: str):
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v & (v - 1):
        raise ValueError(f"triton {op}: config[{part!r}][{key!r}] must be a power of two; got {v!r}")


def _check(op: str, cfg: dict) -> dict:
    """``cfg`` checked for ``op`` (a ValueError that says what is wrong); returns it."""
    if op not in OPS:
        raise ValueError(f"triton boundary: unknown op {op!r}; these kernels serve {OPS}")
    if not isinstance(cfg, dict) or set(cfg) != {"projection", "tail"}:
        keys = sorted(cfg) if isinstance(cfg, dict) else cfg
        raise ValueError(f"triton {op}: config must have exactly the parts ['projection', 'tail']; got {keys!r}")
    p, t = cfg["projection"], cfg["tail"]
    if op == "mhc_pre":
        if not isinstance(p, dict):
            raise ValueError(f"triton {op}: config['projection'] must be norm_fn's config dict; got {p!r}")
        norm_fn._check_config("mhc_pre projection", p, norm_fn._FWD_KEYS, ("block_T", "block_K"), ("split_K",))
    else:
        if not isinstance(p, dict) or set(p) != set(_PROJECTION_KEYS):
            raise ValueError(f"triton {op}: config['projection'] must have exactly the keys "
                             f"{list(_PROJECTION_KEYS)}; got {p!r}")
        for k in ("block_T", "block_C"):
            _pow2(op, "projection", p, k)
        if p["block_T"] < 16:
            raise ValueError(f"triton {op}: config['projection']['block_T'] must be >= 16 (a tl.dot dimension); "
                             f"got {p['block_T']}")
        if not isinstance(p["split_K"], int) or p["split_K"] < 1:
            raise ValueError(f"triton {op}: config['projection']['split_K'] must be an int >= 1; "
                             f"got {p['split_K']!r}")
        if p["precision"] not in norm_fn.PRECISIONS:
            raise ValueError(f"triton {op}: config['projection']['precision'] must be one of {norm_fn.PRECISIONS}; "
                             f"got {p['precision']!r}")
    if not isinstance(t, dict) or set(t) != set(_TAIL_KEYS):
        raise ValueError(f"triton {op}: config['tail'] must have exactly the keys {list(_TAIL_KEYS)}; got {t!r}")
    for k in ("block_T", "block_C"):
        _pow2(op, "tail", t, k)
    if t["block_C"] < 16:
        raise ValueError(f"triton {op}: config['tail']['block_C'] must be >= 16; got {t['block_C']}")
    if t["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"triton {op}: config['tail']['num_warps'] must be 1, 2, 4, 8 or 16; got {t['num_warps']!r}")
    if not isinstance(t["num_stages"], int) or t["num_stages"] < 1:
        raise ValueError(f"triton {op}: config['tail']['num_stages'] must be an int >= 1; got {t['num_stages']!r}")
    return cfg


def check_config(op: str, call, cfg: dict):
    """The registry's check: why ``cfg`` cannot serve ``op`` (a stored entry is then ignored), else None."""
    try:
        _check(op, cfg)
    except ValueError as e:
        return str(e)
    return None


# -- launch wrappers ----------------------------------------------------------------------------------
def _sp_project(residual, prev_pre, fn, norm_weight, p: dict, post=None, collapse=True) -> SimpleNamespace:
    """Launch 1 of the fused boundaries (:func:`_sp_project_kernel`; none at T = 0) -> namespace of
    ``new_residual`` (with ``post``), ``u`` (the layer input buffer, written when ``collapse``), the partials
    ``part_dot``, ``part_sq``, ``part_usq`` (``collapse`` only), ``split`` and ``rows_p``."""
    T, n, C = residual.shape
    rows = fn.shape[0]
    dev = residual.device
    alloc = norm_fn._alloc
    new_residual = None if post is None else alloc((T, n, C), residual.dtype, dev)
    u = alloc((T, C), residual.dtype, dev)
    block_T, block_C = p["block_T"], max(p["block_C"], triton.cdiv(16, n))
    c_blocks = triton.cdiv(C, block_C)
    split = max(1, min(p["split_K"], c_blocks))
    c_per_split = triton.cdiv(c_blocks, split) * block_C
    split = triton.cdiv(C, c_per_split)  # no empty split
    part_dot = alloc((split, T, rows), torch.float32, dev)
    part_sq = alloc((split, T), torch.float32, dev)
    part_usq = alloc((split, T), torch.float32, dev) if collapse else part_sq
    rows_p = max(16, common.next_pow2(rows))
    out = SimpleNamespace(new_residual=new_residual, u=u, part_dot=part_dot, part_sq=part_sq, part_usq=part_usq,
                          split=split, rows_p=rows_p)
    if T == 0:
        return out
    y, post_mix_in, comb_in = post if post is not None else (residual, fn, fn)
    _sp_project_kernel[(triton.cdiv(T, block_T), split)](
        y, residual, post_mix_in, comb_in, prev_pre if prev_pre is not None else fn, fn,
        norm_weight if norm_weight is not None else fn, new_residual if post is not None else residual, u,
        part_dot, part_sq, part_usq, T, C, rows, c_per_split,
        N=n, ROWS_P=rows_p, BLOCK_T=block_T, BLOCK_C=block_C, HAS_POST=post is not None, COLLAPSE=collapse,
        FIRST=prev_pre is None, HAS_NW=norm_weight is not None, BITS=_BITS[residual.dtype],
        PRECISION=p["precision"], num_warps=p["num_warps"], num_stages=p["num_stages"])
    return out


def _tail(x, u, scale, base, out_norm_weight, mixes, rstd, split, part_dot, part_sq, part_usq, rows_p, norm_eps,
          pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, cfg: dict, collapse: bool):
    """Launch 2 (:func:`_boundary_tail_kernel`; none at T = 0) -> (pre, post_mix, comb_mix, out_rstd, fp8_codes,
    fp8_scales); ``mixes``, ``rstd`` (from the partials when ``split > 0``) and ``u`` are written in place. The
    FP8 copy is ``(T, C)`` codes (uint8: the float8_e4m3fn bytes) and ``(T, C / fp8_group)`` scales (float32, or
    E8M0 bytes for group 32: ``fp8_scale_dtype``), ``(T, 0)`` each without a group; with one the tail's column
    step is :func:`fp8_block_C`."""
    T, n, C = x.shape
    dev = x.device
    alloc = norm_fn._alloc
    pre, post, comb = (alloc(sh, torch.float32, dev) for sh in ((T, n), (T, n), (T, n, n)))
    out_rstd = alloc((T,), torch.float32, dev)
    codes = alloc((T, C if fp8_group else 0), torch.uint8, dev)
    fp8_scales = alloc((T, C // fp8_group if fp8_group else 0), fp8_scale_dtype(fp8_group), dev)
    out = pre, post, comb, out_rstd, codes, fp8_scales
    if T == 0:
        return out
    w = out_norm_weight
    if w is not None and not w.is_contiguous():
        w = w.contiguous()
    _boundary_tail_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        part_dot, part_sq, part_usq, scale, base, x, w if w is not None else scale, mixes, rstd, pre, post, comb,
        u, out_rstd, codes, fp8_scales, T, C, mixes.shape[1], float(norm_eps), float(pre_eps), float(post_mult),
        int(iters), float(sinkhorn_eps), float(out_norm_eps),
        N=n, ROWS_P=rows_p, BLOCK_T=cfg["block_T"], BLOCK_C=fp8_block_C(cfg, fp8_group), SPLIT_K=split,
        COLLAPSE=collapse, HAS_ONW=w is not None, FP8_GROUP=fp8_group, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return out


def fp8_block_C(cfg: dict, group: int) -> int:
    """The tail's column step: ``cfg["block_C"]``, and with an FP8 copy (``group`` > 0) whole groups per step
    (at least ``group``) and at most 4 elements per thread (``128 * num_warps / block_T`` columns). The group
    tensors and the e4m3 bit arithmetic are register-hungry and ptxas allocates them erratically: at sm_90a,
    4 warps, 16 elements per thread (2 x 1024) took 125-128 registers and spilled 8 bytes with triton 3.6, 8 per
    thread (2 x 512) spilled 8 bytes with triton 3.9 at groups of 32; 4 per thread takes 40-58 registers with
    both, no spills."""
    if not group:
        return cfg["block_C"]
    return max(group, min(cfg["block_C"], 128 * cfg["num_warps"] // cfg["block_T"]))


def _boundary(op, residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
              iters, sinkhorn_eps, out_norm_eps, fp8_group, config, post=None):
    """Single-pass: the main loop with the collapse, then the tail without it."""
    T = residual.shape[0]
    rows = fn.shape[0]
    cfg = _check(op, config)
    pr = _sp_project(residual, prev_pre, fn, norm_weight, cfg["projection"], post=post)
    mixes = norm_fn._alloc((T, rows), torch.float32, residual.device)
    rstd = norm_fn._alloc((T,), torch.float32, residual.device)
    pre, post_mix, comb, out_rstd, codes, fp8_scales = _tail(
        residual, pr.u, scale, base, out_norm_weight, mixes, rstd, pr.split, pr.part_dot, pr.part_sq, pr.part_usq,
        pr.rows_p, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, cfg["tail"],
        collapse=False)
    return pr.new_residual, pr.u, pre, post_mix, comb, mixes, rstd, out_rstd, codes, fp8_scales


def mhc_pre_sp_fwd(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
                   iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *, config: dict):
    """contract §14 -> (layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales) in two
    launches: the residual read once (projection, sums of squares and the collapse in one main loop), then the
    boundary tail (split reduction, split_mixes and, with ``out_norm_weight``, the in-place out-norm; with
    ``fp8_group`` the FP8 copy). Bytes: the module docstring."""
    return _boundary("mhc_pre_sp", residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                     pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, config)[1:]


def post_pre_sp_fwd(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
                    out_norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *,
                    config: dict):
    """contract §14 -> (new_residual, layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes,
    fp8_scales) in two launches: post, the collapse and the projection in one main loop (``y`` and the residual
    read once, the new residual and the layer input written once), then the boundary tail as
    :func:`mhc_pre_sp_fwd`."""
    return _boundary("post_pre_sp", residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                     pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, config,
                     post=(layer_output, post_mix.contiguous(), comb_mix.contiguous()))


def mhc_pre_fwd(residual, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult, iters,
                sinkhorn_eps, out_norm_eps, fp8_group=0, *, config: dict):
    """contract §6 -> (layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales) in two
    launches: norm_fn's main loop (``config["projection"]``, norm_fn's keys: the chain's projection, bit for
    bit), then the boundary tail (its split reduction when split, split_mixes, the collapse with this site's pre
    and, with ``out_norm_weight``, the sublayer's RMSNorm, ``out_rstd`` ones without; with ``fp8_group`` the FP8
    copy of the layer input from the registers that store it). The residual is read twice."""
    T, n, C = residual.shape
    cfg = _check("mhc_pre", config)
    pr = norm_fn.project(residual, fn, norm_weight, norm_eps, config=cfg["projection"])
    u = norm_fn._alloc((T, C), residual.dtype, residual.device)
    split = pr.split_K if pr.split_K > 1 else 0
    _, post_mix, comb, out_rstd, codes, fp8_scales = _tail(
        residual, u, scale, base, out_norm_weight, pr.mixes, pr.rstd, split, pr.part_dot, pr.part_sq, pr.part_sq,
        pr.rows_p, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, cfg["tail"],
        collapse=True)
    return u, post_mix, comb, pr.mixes, pr.rstd, out_rstd, codes, fp8_scales


def post_pre_fwd(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                 pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *, config: dict):
    """contract §8 -> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes,
    fp8_scales) of the next site in two launches: post fused into the projection's main loop (the new residual
    written once and projected from registers: post's arithmetic, bit for bit), then the boundary tail as
    :func:`mhc_pre_fwd` on the stored new residual (read back once)."""
    T = residual.shape[0]
    rows = fn.shape[0]
    cfg = _check("post_pre", config)
    pr = _sp_project(residual, None, fn, norm_weight, cfg["projection"],
                     post=(layer_output, post_mix.contiguous(), comb_mix.contiguous()), collapse=False)
    mixes = norm_fn._alloc((T, rows), torch.float32, residual.device)
    rstd = norm_fn._alloc((T,), torch.float32, residual.device)
    _, post_next, comb_next, out_rstd, codes, fp8_scales = _tail(
        pr.new_residual, pr.u, scale, base, out_norm_weight, mixes, rstd, pr.split, pr.part_dot, pr.part_sq,
        pr.part_usq, pr.rows_p, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group,
        cfg["tail"], collapse=True)
    return pr.new_residual, pr.u, post_next, comb_next, mixes, rstd, out_rstd, codes, fp8_scales


# -- ahead-of-time specs ----------------------------------------------------------------------------
_TY = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def aot_specs(n: int, C: int, dtype: torch.dtype, T: int = 4096) -> list[common.AotSpec]:
    """The kernels of this module at their default GPU configs for a (T=4096, n, C, dtype) call: the main loop
    of mhc_pre_sp (a middle site: carried pre, norm weight), of post_pre_sp (a middle and the first site) and of
    post_pre (post + projection, no collapse); the boundary tail of the single-pass ops (with and without the
    out-norm) and of mhc_pre / post_pre (the collapse, with and without the out-norm; at norm_fn's default
    split and, the longest split reduction, 16 splits); and the tail writing the FP8 copy, from the out-norm's
    loop (single-pass, groups of 128) and from the collapse's (groups of 32), where C has whole groups."""
    act = _TY[dtype]
    rows = mix_count(n)
    rows_p = max(16, common.next_pow2(rows))
    call = SimpleNamespace(T=T, n=n, C=C, dtype=dtype, device=torch.device("cuda"))
    sig = {"y_ptr": act, "x_ptr": act, "post_ptr": "*fp32", "comb_ptr": "*fp32", "w_ptr": "*fp32",
           "fn_ptr": "*fp32", "nw_ptr": "*fp32", "out_ptr": act, "u_ptr": act, "part_dot_ptr": "*fp32",
           "part_sq_ptr": "*fp32", "part_usq_ptr": "*fp32", "T": "i32", "C": "i32", "rows": "i32",
           "c_per_split": "i32", "N": "constexpr", "ROWS_P": "constexpr", "BLOCK_T": "constexpr",
           "BLOCK_C": "constexpr", "HAS_POST": "constexpr", "COLLAPSE": "constexpr", "FIRST": "constexpr",
           "HAS_NW": "constexpr", "BITS": "constexpr", "PRECISION": "constexpr"}
    specs = []
    for name, has_post, collapse, first in (("sp_project", False, True, False),
                                            ("sp_project_post", True, True, False),
                                            ("sp_project_post_first", True, True, True),
                                            ("post_project", True, False, False)):
        p = _projection_default(call, with_post=has_post)
        block_C = max(p["block_C"], triton.cdiv(16, n))
        specs.append(common.AotSpec(
            name, _sp_project_kernel, dict(sig),
            dict(N=n, ROWS_P=rows_p, BLOCK_T=p["block_T"], BLOCK_C=block_C, HAS_POST=has_post, COLLAPSE=collapse,
                 FIRST=first, HAS_NW=not first, BITS=_BITS[dtype], PRECISION=p["precision"]),
            num_warps=p["num_warps"], num_stages=p["num_stages"], config=p))
    tail_sig = {"part_dot_ptr": "*fp32", "part_sq_ptr": "*fp32", "part_usq_ptr": "*fp32", "scale_ptr": "*fp32",
                "base_ptr": "*fp32", "x_ptr": act, "onw_ptr": "*fp32", "mixes_ptr": "*fp32", "rstd_ptr": "*fp32",
                "pre_ptr": "*fp32", "post_ptr": "*fp32", "comb_ptr": "*fp32", "u_ptr": act, "out_rstd_ptr": "*fp32",
                "codes_ptr": "*u8", "fp8_scales_ptr": "*fp32", "T": "i32", "C": "i32", "rows": "i32",
                "norm_eps": "fp32", "pre_eps": "fp32", "post_mult": "fp32",
                "iters": "i32", "sinkhorn_eps": "fp32", "out_norm_eps": "fp32", "N": "constexpr",
                "ROWS_P": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr", "SPLIT_K": "constexpr",
                "COLLAPSE": "constexpr", "HAS_ONW": "constexpr", "FP8_GROUP": "constexpr"}
    t = _tail_default(call)
    sp_split = _projection_default(call)["split_K"]
    nf_split = norm_fn.norm_fn_default_config(SimpleNamespace(T=T, n=n, C=C, rows=rows, device=call.device))["split_K"]
    pre_split = nf_split if nf_split > 1 else 0
    for name, split, collapse, onw, g in (("sp_tail", sp_split, False, False, 0),
                                          ("sp_tail_norm", sp_split, False, True, 0),
                                          ("pre_tail", pre_split, True, False, 0),
                                          ("pre_tail_norm", 16, True, True, 0),
                                          ("sp_tail_norm_fp8", sp_split, False, True, 128),
                                          ("pre_tail_fp8", pre_split, True, False, 32)):
        if g and C % g:
            continue
        specs.append(common.AotSpec(
            name, _boundary_tail_kernel, dict(tail_sig, fp8_scales_ptr=scale_ptr(g)),
            dict(N=n, ROWS_P=rows_p, BLOCK_T=t["block_T"], BLOCK_C=fp8_block_C(t, g), SPLIT_K=split,
                 COLLAPSE=collapse, HAS_ONW=onw, FP8_GROUP=g),
            num_warps=t["num_warps"], num_stages=t["num_stages"],
            config=dict(t, block_C=fp8_block_C(t, g), split_K=split)))
    return specs
