"""``norm_fn`` forward and backward: the reordered-RMSNorm projection.

Forward: ``mixes = (x_flat @ fn_eff^T) * rsqrt(sum(x_flat^2) / K + eps)`` with
``fn_eff = fn * norm_weight`` (folded once per call by the wrapper). The projection
is a ``(T, K) x (K, m)`` product with ``m = n(n+2)`` done with plain float32 FMAs
(no tensor cores): ``fn`` is **not rounded** (no TF32), ``x`` is converted to float32
exactly, products and sums are float32 -- so the result matches the float32
contract to accumulation error. The sum of squares is accumulated in the same main
loop from the same staged tile of ``x``.

Tiling (forward): a CTA owns ``block_T`` tokens and one K-range (``splits`` ranges
when the token count is small, so enough CTAs stream ``x``); it stages ``block_K``
columns of ``x`` and of ``fn`` (rows padded up to a multiple of the per-thread row
tile, padded rows are zero) in shared memory, transposed so a warp reads
consecutive words, and each thread accumulates a ``thread_T x thread_M`` register
tile of dot products (``thread_T + thread_M`` shared loads per ``thread_T * thread_M``
FMAs). With ``splits > 1`` the CTAs write per-split partial dots and sums of squares
and a second kernel adds them in split order (deterministic) and applies rstd.

Backward (DESIGN 2.8), with ``g = d mixes`` and ``r = rstd``:
``d_x = r * (g @ fn_eff) - (r^2 / K) * (g . mixes) * x`` -- one thread per column of
``x`` keeps that column of ``fn_eff`` in registers and loops over a staged block of
tokens; ``d_fn_eff = (g * r)^T @ x`` -- one thread per column accumulates its ``m``
sums over a token range, each CTA writing a per-token-range partial that the wrapper
sums in order (deterministic, no atomics).

Config keys: ``block_T``, ``block_K``, ``thread_T``, ``thread_M``, ``splits`` (forward);
``bwd_block_T``, ``bwd_block_K``, ``dfn_block_T``, ``dfn_splits`` (backward).
"""

import torch

from .common import KernelDef, Shape, cdiv, dtype_name, get_kernel, kernel_def, max_vec, num_sms, resolve_config

FUSED_KEYS = ("block_T", "block_K", "thread_T", "thread_M")
FWD_KEYS = FUSED_KEYS + ("splits",)
FIN_KEYS = ("splits",)
DX_KEYS = ("bwd_block_T", "bwd_block_K")
DFN_KEYS = ("dfn_block_T", "bwd_block_K", "dfn_splits")


def mix_rows(n: int) -> int:
    return n * (n + 2)


def _row_tiling(m: int):
    """(row groups, rows per thread) for the forward register tile."""
    if m <= 4:
        return 1, 4
    if m <= 8:
        return 2, 4
    if m <= 24:
        return 4, cdiv(m, 4)
    return 8, cdiv(m, 8)


def _fwd_threads(cfg, m):
    return (cfg["block_T"] // cfg["thread_T"]) * cdiv(m, cfg["thread_M"])


def _pow2_floor(x: int) -> int:
    return 1 << (int(x).bit_length() - 1)


def default_config(op: str, s: Shape) -> dict:
    m = mix_rows(s.n)
    K = s.n * s.C
    rg, tm = _row_tiling(m)
    tt = 4 if m > 4 else 2
    bt = 128 if rg <= 4 else 64
    bt = max(bt, (128 // rg) * tt) if rg * (bt // tt) < 64 else bt
    bk = 32
    # split K when the token blocks alone cannot fill the GPU (2 CTAs per SM)
    tblocks = max(1, cdiv(max(s.T, 1), bt))
    splits = max(1, min(cdiv(2 * num_sms(), tblocks), cdiv(K, 8 * bk), 64))
    splits = _pow2_floor(splits)  # few distinct values: each is a compiled kernel, whatever T is
    cfg = {"block_T": bt, "block_K": bk, "thread_T": tt, "thread_M": tm, "splits": splits,
           "bwd_block_T": 32, "bwd_block_K": 128, "dfn_block_T": 32}
    # d_fn: enough token ranges that K/bwd_block_K * dfn_splits CTAs fill the GPU
    kblocks = cdiv(K, 128)
    cfg["dfn_splits"] = _pow2_floor(max(1, min(cdiv(2 * num_sms(), kblocks), cdiv(max(s.T, 1), 32), 256)))
    return cfg


def config_space(op: str, s: Shape) -> list[dict]:
    d = default_config(op, s)
    out = [d]
    if op == "norm_fn":
        for bk in (16, 32, 64):
            for sp in sorted({1, 2, 4, 8, d["splits"]}):
                c = dict(d, block_K=bk, splits=sp)
                if c not in out:
                    out.append(c)
    else:
        for bt in (16, 32, 64):
            for bk in (64, 128, 256):
                for ds in sorted({d["dfn_splits"], max(1, d["dfn_splits"] // 2), d["dfn_splits"] * 2}):
                    c = dict(d, bwd_block_T=bt, bwd_block_K=bk, dfn_block_T=bt, dfn_splits=ds)
                    if c not in out:
                        out.append(c)
    return out


# -- forward -------------------------------------------------------------------------------------
def _build_fwd(n, C, dtype, cfg, fused, rows=None):
    """Main loop. ``fused``: one K range (splits == 1), finalise in place; else write partials."""
    import tilelang.language as T

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bk, TT, TM = cfg["block_T"], cfg["block_K"], cfg["thread_T"], cfg["thread_M"]
    S = 1 if fused else cfg["splits"]
    RG = cdiv(m, TM)
    MP = RG * TM                      # m padded up to the register tile
    TG = bt // TT
    threads = TG * RG
    V = max_vec(dtype, C)             # x vector (divides C, hence K and block_K)
    while bk % V:
        V //= 2
    VF = 4 if K % 4 == 0 and bk % 4 == 0 else (2 if K % 2 == 0 and bk % 2 == 0 else 1)
    KS = cdiv(cdiv(K, S), bk) * bk    # K per split, whole chunks
    NCH = KS // bk
    XL = cdiv(bt * (bk // V), threads)
    FL = cdiv(MP * (bk // VF), threads)
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_fwd(x: T.Tensor((Tn, K), dt), fn: T.Tensor((m, K), "float32"),
                    mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),
                    part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                    eps: T.float32):
        with T.Kernel(T.ceildiv(Tn, bt), S, threads=threads) as (bx, bs):
            tx = T.get_thread_binding(0)
            xs = T.alloc_shared((bk, bt), "float32")   # transposed: [k, token]
            fs = T.alloc_shared((bk, MP), "float32")   # transposed: [k, row]
            acc = T.alloc_local((TT * TM,), "float32")
            sq = T.alloc_local((TT,), "float32")
            xr = T.alloc_local((TT,), "float32")
            fr = T.alloc_local((TM,), "float32")
            xv = T.alloc_local((V,), dt)
            fv = T.alloc_local((VF,), "float32")
            rg = tx % RG
            tg = tx // RG
            for e in T.unroll(TT * TM):
                acc[e] = 0.0
            for e in T.unroll(TT):
                sq[e] = 0.0
            kbeg = bs * KS
            for ch in T.serial(NCH):
                k0 = kbeg + ch * bk
                # stage x (converted to float32; zero outside the tokens / K range)
                for it in T.serial(XL):
                    idx = it * threads + tx
                    if idx < bt * (bk // V):
                        t = idx % bt
                        kv = idx // bt
                        tok = bx * bt + t
                        q = k0 + kv * V
                        if tok < Tn and q < K:
                            for v in T.vectorized(V):
                                xv[v] = x[tok, q + v]
                            for v in T.unroll(V):
                                xs[kv * V + v, t] = T.cast(xv[v], "float32")
                        else:
                            for v in T.unroll(V):
                                xs[kv * V + v, t] = 0.0
                # stage fn (padded rows and the K tail are zero)
                for it in T.serial(FL):
                    idx = it * threads + tx
                    if idx < MP * (bk // VF):
                        kv = idx % (bk // VF)
                        j = idx // (bk // VF)
                        q = k0 + kv * VF
                        if j < m and q < K:
                            for v in T.vectorized(VF):
                                fv[v] = fn[j, q + v]
                            for v in T.unroll(VF):
                                fs[kv * VF + v, j] = fv[v]
                        else:
                            for v in T.unroll(VF):
                                fs[kv * VF + v, j] = 0.0
                T.sync_threads()
                for kk in T.serial(bk):
                    for a in T.unroll(TT):
                        xr[a] = xs[kk, tg * TT + a]
                    for b in T.unroll(TM):
                        fr[b] = fs[kk, rg * TM + b]
                    for a in T.unroll(TT):
                        sq[a] += xr[a] * xr[a]
                        for b in T.unroll(TM):
                            acc[a * TM + b] += xr[a] * fr[b]
                T.sync_threads()
            for a in T.unroll(TT):
                tok = bx * bt + tg * TT + a
                if tok < Tn:
                    if fused:
                        r = T.alloc_var("float32")
                        r = T.rsqrt(sq[a] / K + eps)
                        if rg == 0:
                            rstd[tok] = r
                        for b in T.unroll(TM):
                            if rg * TM + b < m:
                                mixes[tok, rg * TM + b] = acc[a * TM + b] * r
                    else:
                        if rg == 0:
                            part_sq[bs, tok] = sq[a]
                        for b in T.unroll(TM):
                            if rg * TM + b < m:
                                part_mix[bs, tok, rg * TM + b] = acc[a * TM + b]

    return norm_fn_fwd


def _build_fwd_fused(n, C, dtype, cfg, rows=None):
    return _build_fwd(n, C, dtype, dict(cfg, splits=1), fused=True, rows=rows)


def _build_fwd_splitk(n, C, dtype, cfg, rows=None):
    return _build_fwd(n, C, dtype, dict(cfg, splits=max(2, cfg["splits"])), fused=False, rows=rows)


def _build_fwd_finalize(n, C, dtype, cfg, rows=None):
    import tilelang.language as T

    m = rows or mix_rows(n)
    K = n * C
    S = cfg["splits"]
    bt = 128
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_finalize(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                         mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"), eps: T.float32):
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            r = T.alloc_var("float32")
            s = T.alloc_var("float32")
            tok = bx * bt + tx
            if tok < Tn:
                s = 0.0
                for sp in T.serial(S):
                    s += part_sq[sp, tok]
                r = T.rsqrt(s / K + eps)
                rstd[tok] = r
                for j in T.serial(m):
                    s = 0.0
                    for sp in T.serial(S):
                        s += part_mix[sp, tok, j]
                    mixes[tok, j] = s * r

    return norm_fn_finalize


# -- backward --------------------------------------------------------------------------------------
def _build_bwd_dx(n, C, dtype, cfg, rows=None, apply=False, residual_grad=False):
    """d_x of the projection; ``apply`` adds ``w[t, i] * g_apply[t, c]`` (the collapse's gradient, for
    the fused ``mhc_pre`` / ``mhc_head`` backward) and ``residual_grad`` adds an incoming residual
    gradient, all in float32 before the single rounding to the residual dtype."""
    import tilelang.language as T

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bq = cfg["bwd_block_T"], cfg["bwd_block_K"]
    threads = bq
    GL = cdiv(bt * m, threads)
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_bwd_dx(g: T.Tensor((Tn, m), "float32"), x: T.Tensor((Tn, K), dt), fn: T.Tensor((m, K), "float32"),
                       mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),
                       w: T.Tensor((Tn, n), "float32"), g_apply: T.Tensor((Tn, C), dt),
                       g_res: T.Tensor((Tn, K), dt), dx: T.Tensor((Tn, K), dt)):
        with T.Kernel(T.ceildiv(K, bq), T.ceildiv(Tn, bt), threads=threads) as (bx, by):
            tx = T.get_thread_binding(0)
            grs = T.alloc_shared((bt, m), "float32")    # g * rstd
            coef = T.alloc_shared((bt,), "float32")     # rstd^2 / K * (g . mixes)
            f = T.alloc_local((m,), "float32")
            acc = T.alloc_var("float32")
            q = bx * bq + tx
            if q < K:
                for k in T.unroll(m):
                    f[k] = fn[k, q]
            for it in T.serial(GL):
                idx = it * threads + tx
                if idx < bt * m:
                    t = idx // m
                    k = idx % m
                    tok = by * bt + t
                    if tok < Tn:
                        grs[t, k] = g[tok, k] * rstd[tok]
                    else:
                        grs[t, k] = 0.0
            if tx < bt:
                tok = by * bt + tx
                if tok < Tn:
                    acc = 0.0
                    for k in T.serial(m):
                        acc += g[tok, k] * mixes[tok, k]
                    coef[tx] = rstd[tok] * rstd[tok] / K * acc
                else:
                    coef[tx] = 0.0
            T.sync_threads()
            if q < K:
                for t in T.serial(bt):
                    tok = by * bt + t
                    if tok < Tn:
                        acc = 0.0
                        for k in T.unroll(m):
                            acc += grs[t, k] * f[k]
                        acc = acc - coef[t] * T.cast(x[tok, q], "float32")
                        if apply:
                            acc += w[tok, q // C] * T.cast(g_apply[tok, q % C], "float32")
                        if residual_grad:
                            acc += T.cast(g_res[tok, q], "float32")
                        dx[tok, q] = T.cast(acc, dt)

    return norm_fn_bwd_dx


def _build_bwd_dfn(n, C, dtype, cfg, rows=None):
    import tilelang.language as T

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bq, S = cfg["dfn_block_T"], cfg["bwd_block_K"], cfg["dfn_splits"]
    threads = bq
    GL = cdiv(bt * m, threads)
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_bwd_dfn(g: T.Tensor((Tn, m), "float32"), x: T.Tensor((Tn, K), dt),
                        rstd: T.Tensor((Tn,), "float32"), part_dfn: T.Tensor((S, m, K), "float32")):
        with T.Kernel(T.ceildiv(K, bq), S, threads=threads) as (bx, bs):
            tx = T.get_thread_binding(0)
            grs = T.alloc_shared((bt, m), "float32")
            acc = T.alloc_local((m,), "float32")
            xq = T.alloc_var("float32")
            q = bx * bq + tx
            # this CTA's token range: whole blocks of bt, split as evenly as possible
            nblk = T.ceildiv(Tn, bt)
            b0 = (nblk * bs) // S
            b1 = (nblk * (bs + 1)) // S
            for k in T.unroll(m):
                acc[k] = 0.0
            for blk in T.serial(b1 - b0):
                tok0 = (b0 + blk) * bt
                for it in T.serial(GL):
                    idx = it * threads + tx
                    if idx < bt * m:
                        t = idx // m
                        k = idx % m
                        if tok0 + t < Tn:
                            grs[t, k] = g[tok0 + t, k] * rstd[tok0 + t]
                        else:
                            grs[t, k] = 0.0
                T.sync_threads()
                if q < K:
                    for t in T.serial(bt):
                        if tok0 + t < Tn:
                            xq = T.cast(x[tok0 + t, q], "float32")
                            for k in T.unroll(m):
                                acc[k] += grs[t, k] * xq
                T.sync_threads()
            if q < K:
                for k in T.unroll(m):
                    part_dfn[bs, k, q] = acc[k]

    return norm_fn_bwd_dfn


kernel_def(KernelDef("norm_fn_fwd", "norm_fn", _build_fwd_fused, FUSED_KEYS, aot_T=65536))
kernel_def(KernelDef("norm_fn_fwd_splitk", "norm_fn", _build_fwd_splitk, FWD_KEYS, aot_T=16))
kernel_def(KernelDef("norm_fn_finalize", "norm_fn", _build_fwd_finalize, FIN_KEYS, aot_T=16))
kernel_def(KernelDef("norm_fn_bwd_dx", "norm_fn_bwd", _build_bwd_dx, DX_KEYS))
kernel_def(KernelDef("mhc_pre_bwd_dx", "norm_fn_bwd", _build_bwd_dx, DX_KEYS,
                     lambda s: {"apply": True, "residual_grad": True}))
kernel_def(KernelDef("norm_fn_bwd_dfn", "norm_fn_bwd", _build_bwd_dfn, DFN_KEYS))


# -- launch wrappers -----------------------------------------------------------------------------------
def _cfg(op, like, T, n, C, dtype, config):
    return resolve_config(op, like, Shape(T, n, C, dtype), config, lambda sh: default_config(op, sh))


def _fold(fn, norm_weight):
    return fn.contiguous() if norm_weight is None else (fn * norm_weight).contiguous()


def norm_fn_fwd(residual, fn, norm_weight, norm_eps, *, config=None):
    """-> (mixes (T, rows), rstd (T,)); ``rows`` is fn's row count (m, or n for the head)."""
    Tt, n, C = residual.shape
    m = fn.shape[0]
    rows = None if m == mix_rows(n) else m
    mixes = fn.new_empty((Tt, m))
    rstd = fn.new_empty((Tt,))
    if Tt == 0:
        return mixes, rstd
    cfg = _cfg("norm_fn", residual, Tt, n, C, residual.dtype, config)
    x = residual.view(Tt, n * C)
    f = _fold(fn, norm_weight)
    S = cfg["splits"]
    dev = residual.device
    if S == 1:
        dummy = fn.new_empty((1, Tt, m)), fn.new_empty((1, Tt))
        get_kernel("norm_fn_fwd", n, C, residual.dtype, cfg, dev, rows=rows)(
            x, f, mixes, rstd, *dummy, float(norm_eps))
    else:
        pm = fn.new_empty((S, Tt, m))
        ps = fn.new_empty((S, Tt))
        get_kernel("norm_fn_fwd_splitk", n, C, residual.dtype, cfg, dev, rows=rows)(
            x, f, mixes, rstd, pm, ps, float(norm_eps))
        get_kernel("norm_fn_finalize", n, C, residual.dtype, cfg, dev, rows=rows)(pm, ps, mixes, rstd, float(norm_eps))
    return mixes, rstd


def norm_fn_bwd_fused(grad_mixes, residual, fn, norm_weight, mixes, rstd, *, apply_w=None, apply_grad=None,
                      grad_residual=None, config=None):
    """-> (d_residual, d_fn_eff); optionally adds ``apply_w[t, i] * apply_grad[t, c]`` and
    ``grad_residual`` to d_residual in float32 before its single rounding."""
    Tt, n, C = residual.shape
    m = fn.shape[0]
    K = n * C
    rows = None if m == mix_rows(n) else m
    d_res = torch.empty_like(residual)
    if Tt == 0:
        return d_res, fn.new_zeros((m, K))
    cfg = _cfg("norm_fn_bwd", residual, Tt, n, C, residual.dtype, config)
    x = residual.view(Tt, K)
    f = _fold(fn, norm_weight)
    g = grad_mixes.contiguous()
    dev = residual.device
    apply = apply_w is not None
    res = grad_residual is not None
    w = apply_w.contiguous() if apply else fn.new_empty((Tt, n))
    ga = apply_grad.contiguous() if apply else residual.new_empty((Tt, C))
    gr = grad_residual.contiguous().view(Tt, K) if res else residual.new_empty((Tt, K))
    consts = {"rows": rows}
    if apply or res:
        consts.update(apply=apply, residual_grad=res)
    get_kernel("norm_fn_bwd_dx", n, C, residual.dtype, cfg, dev, **consts)(
        g, x, f, mixes, rstd, w, ga, gr, d_res.view(Tt, K))
    part = fn.new_empty((cfg["dfn_splits"], m, K))
    get_kernel("norm_fn_bwd_dfn", n, C, residual.dtype, cfg, dev, rows=rows)(g, x, rstd, part)
    return d_res, part.sum(0)


def norm_fn_bwd(grad_mixes, residual, fn, norm_weight, mixes, rstd, *, config=None):
    """-> (d_residual, d_fn_eff); d_fn_eff is the gradient of fn * norm_weight."""
    return norm_fn_bwd_fused(grad_mixes, residual, fn, norm_weight, mixes, rstd, config=config)
