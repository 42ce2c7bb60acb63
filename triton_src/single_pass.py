"""Triton kernels of single-pass mHC's forward boundary (contract §14): ``mhc_pre_sp`` and ``post_pre_sp``
with the residual read once.

Notation as in the contract: ``x`` the residual ``(T, n, C)``, ``w`` the carried pre ``(T, n)`` float32
(``prev_pre``; absent at the first site, whose collapse is stream 0), ``fn_eff = fn * norm_weight``
``(m, n*C)`` float32, ``u = round(sum_i w_i x_i)`` the layer input before the optional out-norm.

:func:`_sp_project_kernel` -- grid ``(cdiv(T, BLOCK_T), split_K)``, a program owns ``BLOCK_T`` tokens and one
range of columns of *all* ``n`` streams. Per step it loads the ``(BLOCK_T, n, BLOCK_C)`` block of the
residual once (with ``HAS_POST``: ``y`` and the ``n`` residual rows, and forms and stores the new residual
``s_i = round(post_i y + sum_j comb[j, i] x_j)`` instead), and from those values

* the projection partials ``sum_k s[t, k] fn_eff[r, k]`` (``tl.dot``, float32-accurate precision) and
  ``sum_k s[t, k]^2``;
* the collapse ``u = round(sum_i w_i s_i)`` (at the first site ``u = s_0`` bit for bit, picked from the bits),
  stored once, and the partial ``sum_c u[t, c]^2`` of the rounded ``u`` (the out-norm's statistic).

Then :func:`~.norm_fn._norm_fn_finalize_kernel` adds the splits in order (mixes, rstd), the Triton
``split_mixes`` kernel gives ``pre, post, comb``, and with an out-norm weight :func:`_out_norm_kernel`
rewrites the layer input in place as ``round(u * rho * w)``, ``rho = rsqrt(sum_s usq_s / C + eps)``.

Traffic per token (elements of the residual dtype): ``mhc_pre_sp`` reads the residual once and writes the
layer input once, ``(n + 1) * C``; ``post_pre_sp`` reads ``y`` and the residual once and writes the new
residual and the layer input once, ``(2n + 2) * C`` (the spec's floors). The out-norm adds ``2 * C`` (its
statistic needs every column of a token before the first normalised value). Partials: ``split_K * (m + 2)``
floats per token. Summation orders differ from the two-pass kernels' (the dot runs over column blocks of all
streams; ``tl.sum`` over the streams), so results agree with ``mhc_pre`` / ``pre_apply_mix`` to float32
accumulation error, not bit for bit.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import triton
import triton.language as tl

from mhc_kernels.specs import mix_count

from . import common, norm_fn, sinkhorn

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
    HAS_POST: tl.constexpr, FIRST: tl.constexpr, HAS_NW: tl.constexpr, BITS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T), split_K). Every residual (and y) element is loaded by exactly one program, once."""
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
    tl.store(part_usq_ptr + part, usq, mask=t_ok)


@triton.jit
def _out_norm_kernel(u_ptr, part_usq_ptr, w_ptr, out_rstd_ptr, T, C, eps,
                     SPLIT_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), cdiv(C, BLOCK_C)): rho = rsqrt(sum_s usq[s] / C + eps) (splits in order);
    u <- round(u * rho * w) in place; the first column block stores rho as out_rstd."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < T
    tc_ok = t_ok[:, None] & (c < C)[None, :]
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        ss += tl.load(part_usq_ptr + s * T + t, mask=t_ok, other=0.0)
    rho = tl.math.rsqrt(ss / C + eps)
    offs = t.to(tl.int64)[:, None] * C + c[None, :]
    u = tl.load(u_ptr + offs, mask=tc_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + c, mask=c < C, other=0.0)
    tl.store(u_ptr + offs, (u * rho[:, None] * w[None, :]).to(u_ptr.dtype.element_ty), mask=tc_ok)
    if tl.program_id(1) == 0:
        tl.store(out_rstd_ptr + t, rho, mask=t_ok)


# -- configs ----------------------------------------------------------------------------------------
def _on_cpu(call) -> bool:
    return getattr(call, "device", None) is not None and torch.device(call.device).type == "cpu"


_PROJECTION_KEYS = ("block_T", "block_C", "split_K", "num_warps", "num_stages", "precision")


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


def default_config(op: str, call) -> dict:
    """``{"projection": the fused main loop's tiling, "split_mixes": the Triton split_mixes kernel's}``."""
    return {"projection": _projection_default(call, with_post=op == "post_pre_sp"),
            "split_mixes": sinkhorn.default_config("split_mixes", call)}


def config_space(op: str, call) -> list[dict]:
    """The default, then the projection's block and split choices at the default split_mixes config."""
    d = default_config(op, call)
    out = [d]
    n = call.n
    for bt in (16, 32, 64):
        for bc in sorted({max(16 // n, 1), max(32 // n, 1), max(64 // n, 1), 16}):
            for sp in (1, 2, 4, 8, 16):
                if sp > 1 and sp * bc > call.C:
                    continue
                cand = dict(d, projection=dict(d["projection"], block_T=bt, block_C=bc, split_K=sp))
                if cand not in out:
                    out.append(cand)
    return out


def _check(cfg: dict) -> dict:
    p = cfg.get("projection") if isinstance(cfg, dict) else None
    if not isinstance(p, dict) or set(p) != set(_PROJECTION_KEYS):
        raise ValueError(f"triton single-pass: config['projection'] must have exactly the keys {list(_PROJECTION_KEYS)}"
                         f"; got {cfg!r}")
    for k in ("block_T", "block_C"):
        if not isinstance(p[k], int) or p[k] < 1 or p[k] & (p[k] - 1):
            raise ValueError(f"triton single-pass: projection {k} must be a power of two; got {p[k]!r}")
    if p["block_T"] < 16:
        raise ValueError("triton single-pass: projection block_T must be >= 16 (a tl.dot dimension); "
                         f"got {p['block_T']}")
    if p["precision"] not in norm_fn.PRECISIONS:
        raise ValueError(f"triton single-pass: projection precision must be one of {norm_fn.PRECISIONS}; "
                         f"got {p['precision']!r}")
    return p


# -- launch wrappers ----------------------------------------------------------------------------------
def _boundary(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
              iters, sinkhorn_eps, out_norm_eps, config, post=None):
    T, n, C = residual.shape
    rows = fn.shape[0]
    dev = residual.device
    p = _check(config)
    alloc = norm_fn._alloc
    new_residual = None if post is None else alloc((T, n, C), residual.dtype, dev)
    u = alloc((T, C), residual.dtype, dev)
    mixes = alloc((T, rows), torch.float32, dev)
    rstd = alloc((T,), torch.float32, dev)
    if T == 0:
        out_rstd = alloc((0,), torch.float32, dev)
        pre, post_mix, comb = (alloc(s, torch.float32, dev) for s in ((0, n), (0, n), (0, n, n)))
        return new_residual, u, pre, post_mix, comb, mixes, rstd, out_rstd
    block_T, block_C = p["block_T"], max(p["block_C"], triton.cdiv(16, n))
    c_blocks = triton.cdiv(C, block_C)
    split = max(1, min(p["split_K"], c_blocks))
    c_per_split = triton.cdiv(c_blocks, split) * block_C
    split = triton.cdiv(C, c_per_split)  # no empty split
    part_dot = alloc((split, T, rows), torch.float32, dev)
    part_sq = alloc((split, T), torch.float32, dev)
    part_usq = alloc((split, T), torch.float32, dev)
    rows_p = max(16, common.next_pow2(rows))
    y, post_mix_in, comb_in = post if post is not None else (residual, fn, fn)
    _sp_project_kernel[(triton.cdiv(T, block_T), split)](
        y, residual, post_mix_in, comb_in, prev_pre if prev_pre is not None else fn, fn,
        norm_weight if norm_weight is not None else fn, new_residual if post is not None else residual, u,
        part_dot, part_sq, part_usq, T, C, rows, c_per_split,
        N=n, ROWS_P=rows_p, BLOCK_T=block_T, BLOCK_C=block_C, HAS_POST=post is not None, FIRST=prev_pre is None,
        HAS_NW=norm_weight is not None, BITS=_BITS[residual.dtype], PRECISION=p["precision"],
        num_warps=p["num_warps"], num_stages=p["num_stages"])
    norm_fn._norm_fn_finalize_kernel[(triton.cdiv(T, block_T),)](
        part_dot, part_sq, mixes, rstd, T, n * C, rows, float(norm_eps),
        ROWS_P=rows_p, BLOCK_T=block_T, SPLIT_K=split, num_warps=4)
    pre, post_mix, comb = sinkhorn.split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps,
                                                   config=config["split_mixes"])
    if out_norm_weight is None:
        out_rstd = torch.ones((T,), dtype=torch.float32, device=dev)
    else:
        out_rstd = alloc((T,), torch.float32, dev)
        bt = 1 if C >= 1024 else max(1, min(16, 1024 // common.next_pow2(C)))
        bc = min(1024, common.next_pow2(C))
        _out_norm_kernel[(triton.cdiv(T, bt), triton.cdiv(C, bc))](
            u, part_usq, out_norm_weight.float().contiguous(), out_rstd, T, C, float(out_norm_eps),
            SPLIT_K=split, BLOCK_T=bt, BLOCK_C=bc, num_warps=4)
    return new_residual, u, pre, post_mix, comb, mixes, rstd, out_rstd


def mhc_pre_sp_fwd(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
                   iters, sinkhorn_eps, out_norm_eps, *, config: dict):
    """contract §14 -> (layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd): the residual read once
    (projection, sums of squares and the collapse in one main loop), then the split reduction, split_mixes
    and, with ``out_norm_weight``, the in-place out-norm. Bytes: the module docstring."""
    return _boundary(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps,
                     post_mult, iters, sinkhorn_eps, out_norm_eps, config)[1:]


def post_pre_sp_fwd(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
                    out_norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, *,
                    config: dict):
    """contract §14 -> (new_residual, layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd): post,
    the collapse and the projection in one main loop (``y`` and the residual read once, the new residual
    and the layer input written once), then as :func:`mhc_pre_sp_fwd`."""
    return _boundary(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps,
                     post_mult, iters, sinkhorn_eps, out_norm_eps, config,
                     post=(layer_output, post_mix.contiguous(), comb_mix.contiguous()))


# -- ahead-of-time specs ----------------------------------------------------------------------------
_TY = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def aot_specs(n: int, C: int, dtype: torch.dtype, T: int = 4096) -> list[common.AotSpec]:
    """The kernels of this module at their default GPU configs for a (T=4096, n, C, dtype) call: the main loop
    of mhc_pre_sp (a middle site: carried pre, norm weight) and of post_pre_sp (a middle and the first site),
    and the out-norm."""
    act = _TY[dtype]
    rows = mix_count(n)
    call = SimpleNamespace(T=T, n=n, C=C, dtype=dtype, device=torch.device("cuda"))
    sig = {"y_ptr": act, "x_ptr": act, "post_ptr": "*fp32", "comb_ptr": "*fp32", "w_ptr": "*fp32",
           "fn_ptr": "*fp32", "nw_ptr": "*fp32", "out_ptr": act, "u_ptr": act, "part_dot_ptr": "*fp32",
           "part_sq_ptr": "*fp32", "part_usq_ptr": "*fp32", "T": "i32", "C": "i32", "rows": "i32",
           "c_per_split": "i32", "N": "constexpr", "ROWS_P": "constexpr", "BLOCK_T": "constexpr",
           "BLOCK_C": "constexpr", "HAS_POST": "constexpr", "FIRST": "constexpr", "HAS_NW": "constexpr",
           "BITS": "constexpr", "PRECISION": "constexpr"}
    specs = []
    for name, has_post, first in (("sp_project", False, False), ("sp_project_post", True, False),
                                  ("sp_project_post_first", True, True)):
        p = _projection_default(call, with_post=has_post)
        block_C = max(p["block_C"], triton.cdiv(16, n))
        specs.append(common.AotSpec(
            name, _sp_project_kernel, dict(sig),
            dict(N=n, ROWS_P=max(16, common.next_pow2(rows)), BLOCK_T=p["block_T"], BLOCK_C=block_C,
                 HAS_POST=has_post, FIRST=first, HAS_NW=not first, BITS=_BITS[dtype], PRECISION=p["precision"]),
            num_warps=p["num_warps"], num_stages=p["num_stages"], config=p))
    bc = min(1024, common.next_pow2(C))
    specs.append(common.AotSpec(
        "sp_out_norm", _out_norm_kernel,
        {"u_ptr": act, "part_usq_ptr": "*fp32", "w_ptr": "*fp32", "out_rstd_ptr": "*fp32", "T": "i32", "C": "i32",
         "eps": "fp32", "SPLIT_K": "constexpr", "BLOCK_T": "constexpr", "BLOCK_C": "constexpr"},
        dict(SPLIT_K=max(1, _projection_default(call)["split_K"]), BLOCK_T=1, BLOCK_C=bc), num_warps=4,
        num_stages=1, config=dict(block_T=1, block_C=bc)))
    return specs
