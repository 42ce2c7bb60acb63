"""Memory-bound streaming kernels: ``pre_apply_mix``, ``post`` and ``expand``, forward and backward.

Layout of every kernel: a 2-D grid of (token blocks, hidden blocks) -- token blocks on
``blockIdx.x``, whose limit (2^31 - 1) holds any token count, ``blockIdx.y``'s is 65535 -- or
token blocks only where a per-token reduction over ``C`` must stay inside one CTA (the backward
kernels that produce mix gradients, which keeps those sums deterministic and free of
atomics). Inside a CTA, consecutive threads take consecutive vectors of ``vec``
contiguous elements (explicit indexing, so every warp access is a coalesced 16-byte
one; the reducing kernels use ``T.Parallel`` with exactly one vector per thread per
step, which TileLang lays out the same way, and ``T.reduce_sum`` for the per-token
sums). Each vector is loaded once, all math is float32, and each result is rounded to
the residual dtype once.

Config keys (all kernels here): ``block_T`` tokens per CTA, ``block_C`` hidden
elements per CTA (or per loop step for the reducing kernels), ``threads``, ``vec``
elements per access (<= 16 bytes, a power of two dividing C).
"""

import torch

from .common import KernelDef, Shape, cdiv, dtype_name, kernel_def, max_vec, next_pow2

KEYS = ("block_T", "block_C", "threads", "vec")


# -- configs ------------------------------------------------------------------------------
def _valid(cfg: dict) -> bool:
    bt, bc, th, v = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    return bc % v == 0 and (bt * (bc // v)) % th == 0


def default_config(op: str, s: Shape) -> dict:
    if op == "collapse_norm":
        return collapse_norm_config(s)
    v = max_vec(s.dtype, s.C)
    if op in ("pre_apply_mix_bwd", "post_bwd"):
        # one token per CTA, a loop over C; fewer elements per thread at n=8 to bound registers
        if op == "post_bwd" and s.n >= 8:
            v = max(1, min(v, 4))
        threads = 128
        bc = threads * v
        return {"block_T": 1, "block_C": bc, "threads": threads, "vec": v}
    threads = 128
    # one vector per thread per token, at least 512 elements of a row per CTA (scalar accesses
    # when vec == 1), and 4 vectors per thread in total: enough bytes in flight per CTA
    bc = max(v, min(next_pow2(s.C), max(threads * v, 512)))
    nv = bc // v
    bt = max(1, (threads * 4) // nv)
    cfg = {"block_T": bt, "block_C": bc, "threads": threads, "vec": v}
    while not _valid(cfg):
        cfg["block_T"] *= 2
    return cfg


COLLAPSE_NORM_KEYS = ("block_T", "threads", "vec")


def collapse_norm_config(s: Shape) -> dict:
    """The collapse + norm kernel: 4 tokens per CTA, a warp of 32 threads per token walking its row in
    ``vec``-element steps (coalesced 16-byte accesses). Independent of ``T`` (batch invariant)."""
    return {"block_T": 4, "threads": 128, "vec": max_vec(s.dtype, s.C)}


def config_space(op: str, s: Shape) -> list[dict]:
    if op == "collapse_norm":
        v = max_vec(s.dtype, s.C)
        return [{"block_T": bt, "threads": th, "vec": v} for th in (128, 256) for bt in (1, 2, 4, 8)
                if th % bt == 0 and th // bt >= 16]
    vmax = max_vec(s.dtype, s.C)
    vecs = sorted({vmax, max(1, vmax // 2)})
    out = []
    if op in ("pre_apply_mix_bwd", "post_bwd"):
        for th in (64, 128, 256):
            for v in vecs:
                for mult in (1,):  # one vector per thread per step (the reducer's layout)
                    cfg = {"block_T": 1, "block_C": th * v * mult, "threads": th, "vec": v}
                    if _valid(cfg):
                        out.append(cfg)
        return out
    for th in (128, 256):
        for v in vecs:
            for bc in (256, 512, 1024, 2048):
                for bt in (1, 2, 4, 8):
                    cfg = {"block_T": bt, "block_C": bc, "threads": th, "vec": v}
                    if _valid(cfg) and bt * bc // v >= th:
                        out.append(cfg)
    d = default_config(op, s)
    if d not in out:
        out.insert(0, d)
    return out


# -- kernels ---------------------------------------------------------------------------------
def collapse_macro(n: int, V: int, dt: str):
    """``out[tok, col:col+V] = sum_i w[wrow, i] * x[tok, i, col:col+V]`` for one vector: float32 in stream
    order, one rounding. Shared by ``pre_apply_mix_fwd`` (``w`` = the mix, row ``tok``) and the fused
    ``mhc_pre`` tail (``w`` = pre in shared memory, its block row)."""
    import tilelang.language as T

    @T.macro
    def collapse(x, out, w, wrow, tok, col, xv, acc, ov):
        for v in T.vectorized(V):
            acc[v] = 0.0
        for i in T.unroll(n):
            for v in T.vectorized(V):
                xv[v] = x[tok, i, col + v]
            for v in T.vectorized(V):
                acc[v] += w[wrow, i] * T.cast(xv[v], "float32")
        for v in T.vectorized(V):
            ov[v] = T.cast(acc[v], dt)
        for v in T.vectorized(V):
            out[tok, col + v] = ov[v]

    return collapse


def _build_pre_apply_fwd(n, C, dtype, cfg):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NIT = (bt * NV) // th
    Tn = T.dynamic("T")
    collapse = collapse_macro(n, V, dt)

    @T.prim_func
    def pre_apply_mix_fwd(x: T.Tensor((Tn, n, C), dt), mix: T.Tensor((Tn, n), "float32"),   # inputs
                          out: T.Tensor((Tn, C), dt)):                                         # output
        with T.Kernel(T.ceildiv(Tn, bt), T.ceildiv(C, bc), threads=th) as (by, bx):
            xv = T.alloc_local((V,), dt)
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            tx = T.get_thread_binding(0)
            for it in T.serial(NIT):
                # consecutive threads take consecutive vectors of a row: coalesced 16-byte accesses
                idx = it * th + tx
                tok = by * bt + idx // NV
                col = bx * bc + (idx % NV) * V
                if tok < Tn and col < C:
                    # out[t, c] = sum_i mix[t, i] * x[t, i, c]
                    collapse(x, out, mix, tok, tok, col, xv, acc, ov)

    return pre_apply_mix_fwd


def collapse_norm_macros(n: int, C: int, V: int, TPT: int, dt: str, Tn):
    """The collapse + RMSNorm of token rows that ``TPT`` threads each walk in ``V``-element vectors (thread
    ``lane`` takes vectors ``j = it * TPT + lane``), shared by :func:`_build_collapse_norm` and the fused
    ``mhc_pre`` tail with the out-norm (``fused.py``) so the two round identically:

    * ``collapse_sq(x, out, mix, mrow, tok, lane, xv, acc, ov)``: ``u = round(sum_i mix[mrow, i] x_i)`` per
      vector (:func:`collapse_macro`), stored to ``out``; returns this thread's float32 sum of the rounded
      ``u^2`` (its vectors in order);
    * ``token_rho(part_s, t, out_norm_eps)``: ``rsqrt(sum / C + out_norm_eps)`` of token ``t``'s ``TPT`` partials
      added in lane order from 0.0 (every thread of the token gets the same value);
    * ``normalize(out, w, tok, lane, rho, ov)``: rewrites the vectors this thread stored as
      ``round(u * rho * w)`` (only its own writes are read back).

    ``Tn`` (the kernel's symbolic token count) is closed over, not passed (a macro parameter would rename it).
    """
    import tilelang.language as T

    NVEC = C // V                   # vectors per row
    NIT = cdiv(NVEC, TPT)           # vectors per thread
    collapse = collapse_macro(n, V, dt)

    @T.macro
    def collapse_sq(x, out, mix, mrow, tok, lane, xv, acc, ov):
        ss = T.alloc_var("float32")
        ss = 0.0
        for it in T.serial(NIT):
            j = it * TPT + lane
            if tok < Tn and j < NVEC:
                collapse(x, out, mix, mrow, tok, j * V, xv, acc, ov)
                for v in T.serial(V):
                    ss += T.cast(ov[v], "float32") * T.cast(ov[v], "float32")
        return ss

    @T.macro
    def token_rho(part_s, t, out_norm_eps):   # (a macro parameter renames the scalar: not "eps", Sinkhorn's name)
        s = T.alloc_var("float32")
        s = 0.0
        for q in T.serial(TPT):
            s += part_s[t, q]
        return T.rsqrt(s / C + out_norm_eps)

    @T.macro
    def normalize(out, w, tok, lane, rho, ov):
        for it in T.serial(NIT):
            j = it * TPT + lane
            if tok < Tn and j < NVEC:
                for v in T.vectorized(V):
                    ov[v] = out[tok, j * V + v]
                for v in T.vectorized(V):
                    ov[v] = T.cast(T.cast(ov[v], "float32") * rho * w[j * V + v], dt)
                for v in T.vectorized(V):
                    out[tok, j * V + v] = ov[v]

    return collapse_sq, token_rho, normalize


def check_collapse_norm_config(C: int, cfg: dict):
    bt, th, V = cfg["block_T"], cfg["threads"], cfg["vec"]
    if th % bt or C % V:
        raise ValueError(f"collapse_norm: block_T={bt} must divide threads={th} and vec={V} must divide C={C}")


def _build_collapse_norm(n, C, dtype, cfg):
    """``mhc_head_sp`` / ``mhc_pre``'s collapse with the sublayer's RMSNorm, in one kernel.

    Shapes: ``x (T, n, C)`` (residual dtype), ``mix (T, n)``, ``w (C,)`` float32 -> ``out (T, C)`` (residual
    dtype), ``out_rstd (T,)`` float32.
    Grid: token blocks of ``block_T``; ``threads / block_T`` threads per token walk its row in ``vec``-element
    vectors (:func:`collapse_norm_macros`):

    1. ``u = round(sum_i mix_i x_i)`` per vector (``collapse_macro``: ``pre_apply_mix``'s arithmetic, the same
       bits), stored to ``out``, and ``sum u^2`` of the rounded values into a per-thread float32 partial;
    2. the partials of a token into shared memory, one barrier, then every thread of the token adds them in
       lane order (the same value in each: deterministic), ``rho = rsqrt(sum / C + eps)``;
    3. each thread rewrites the vectors *it* stored as ``round(u * rho * w)`` (its own writes: no other
       thread's global data is read).

    Traffic per token: the residual read once (``n * C``), ``out`` written, re-read from cache and written
    (``3 * C``; the statistic needs the whole row before the first normalised value).
    """
    import tilelang.language as T

    dt = dtype_name(dtype)
    check_collapse_norm_config(C, cfg)
    bt, th, V = cfg["block_T"], cfg["threads"], cfg["vec"]
    TPT = th // bt                  # threads per token
    Tn = T.dynamic("T")
    collapse_sq, token_rho, normalize = collapse_norm_macros(n, C, V, TPT, dt, Tn)

    @T.prim_func
    def collapse_norm(x: T.Tensor((Tn, n, C), dt), mix: T.Tensor((Tn, n), "float32"),      # inputs
                      w: T.Tensor((C,), "float32"),
                      out: T.Tensor((Tn, C), dt), out_rstd: T.Tensor((Tn,), "float32"),    # outputs
                      eps: T.float32):                                                    # constant
        with T.Kernel(T.ceildiv(Tn, bt), threads=th) as by:
            tx = T.get_thread_binding(0)
            part_s = T.alloc_shared((bt, TPT), "float32")
            xv = T.alloc_local((V,), dt)
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            rho = T.alloc_var("float32")
            t = tx // TPT
            lane = tx % TPT
            tok = by * bt + t
            # -- u = round(sum_i mix_i x_i), stored; the sum of the rounded u^2 over this thread's vectors ------
            part_s[t, lane] = collapse_sq(x, out, mix, tok, tok, lane, xv, acc, ov)
            T.sync_threads()
            # -- rho = rsqrt(sum of the token's partials (lane order) / C + eps) ------------------------------
            rho = token_rho(part_s, t, eps)
            if tok < Tn and lane == 0:
                out_rstd[tok] = rho
            # -- out = round(u * rho * w) over the vectors this thread stored -------------------------------
            normalize(out, w, tok, lane, rho, ov)

    return collapse_norm


def _build_pre_apply_bwd(n, C, dtype, cfg, write_dx=True):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NCH = cdiv(C, bc)
    Tn = T.dynamic("T")

    @T.prim_func
    def pre_apply_mix_bwd(g: T.Tensor((Tn, C), dt),                                            # gradient in
                          x: T.Tensor((Tn, n, C), dt), mix: T.Tensor((Tn, n), "float32"),      # saved inputs
                          dx: T.Tensor((Tn, n, C), dt), dmix: T.Tensor((Tn, n), "float32")):   # gradients out
        with T.Kernel(T.ceildiv(Tn, bt), threads=th) as by:
            gv = T.alloc_local((V,), dt)
            gf = T.alloc_local((V,), "float32")
            xv = T.alloc_local((V,), dt)
            ov = T.alloc_local((V,), dt)
            part = T.alloc_fragment((bt, n, NV), "float32")
            red = T.alloc_fragment((bt, n), "float32")
            T.clear(part)
            for ch in T.serial(NCH):
                for t, cv in T.Parallel(bt, NV):
                    tok = by * bt + t
                    col = ch * bc + cv * V
                    if tok < Tn and col < C:
                        for v in T.vectorized(V):
                            gv[v] = g[tok, col + v]
                        for v in T.vectorized(V):
                            gf[v] = T.cast(gv[v], "float32")
                        for i in T.unroll(n):
                            # dmix[t, i] += <g[t, cols], x[t, i, cols]>   (per-vector partials)
                            for v in T.vectorized(V):
                                xv[v] = x[tok, i, col + v]
                            for v in T.serial(V):
                                part[t, i, cv] += gf[v] * T.cast(xv[v], "float32")
                            # dx[t, i, c] = mix[t, i] * g[t, c]
                            if write_dx:
                                for v in T.vectorized(V):
                                    ov[v] = T.cast(mix[tok, i] * gf[v], dt)
                                for v in T.vectorized(V):
                                    dx[tok, i, col + v] = ov[v]
            # dmix[t, i] = sum over the vectors of the partials (fixed order: deterministic)
            T.reduce_sum(part, red, dim=2)
            for t, i in T.Parallel(bt, n):
                if by * bt + t < Tn:
                    dmix[by * bt + t, i] = red[t, i]

    return pre_apply_mix_bwd


def _build_post_fwd(n, C, dtype, cfg):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NIT = (bt * NV) // th
    Tn = T.dynamic("T")

    @T.prim_func
    def post_fwd(y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),                  # inputs
                 post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                 out: T.Tensor((Tn, n, C), dt)):                                                # output
        with T.Kernel(T.ceildiv(Tn, bt), T.ceildiv(C, bc), threads=th) as (by, bx):
            xv = T.alloc_local((n, V), dt)   # every stream's vector, read once
            xf = T.alloc_local((n, V), "float32")
            yv = T.alloc_local((V,), dt)
            yf = T.alloc_local((V,), "float32")
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            tx = T.get_thread_binding(0)
            for it in T.serial(NIT):
                # consecutive threads take consecutive vectors of a row: coalesced 16-byte accesses
                idx = it * th + tx
                tok = by * bt + idx // NV
                col = bx * bc + (idx % NV) * V
                if tok < Tn and col < C:
                    for v in T.vectorized(V):
                        yv[v] = y[tok, col + v]
                    for j in T.unroll(n):
                        for v in T.vectorized(V):
                            xv[j, v] = residual[tok, j, col + v]
                    for v in T.vectorized(V):
                        yf[v] = T.cast(yv[v], "float32")
                    for j in T.unroll(n):
                        for v in T.vectorized(V):
                            xf[j, v] = T.cast(xv[j, v], "float32")
                    for i in T.unroll(n):
                        # out[t, i, c] = post[t, i] * y[t, c] + sum_j comb[t, j, i] * x[t, j, c]
                        for v in T.vectorized(V):
                            acc[v] = post[tok, i] * yf[v]
                        for j in T.unroll(n):
                            for v in T.vectorized(V):
                                acc[v] += comb[tok, j, i] * xf[j, v]
                        for v in T.vectorized(V):
                            ov[v] = T.cast(acc[v], dt)
                        for v in T.vectorized(V):
                            out[tok, i, col + v] = ov[v]

    return post_fwd


def _build_post_bwd(n, C, dtype, cfg):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NCH = cdiv(C, bc)
    Tn = T.dynamic("T")

    @T.prim_func
    def post_bwd(g: T.Tensor((Tn, n, C), dt),                                                    # gradient in
                 y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),                  # saved inputs
                 post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                 dy: T.Tensor((Tn, C), dt), dx: T.Tensor((Tn, n, C), dt),                       # gradients out
                 dpost: T.Tensor((Tn, n), "float32"), dcomb: T.Tensor((Tn, n, n), "float32")):
        with T.Kernel(T.ceildiv(Tn, bt), threads=th) as by:
            gv = T.alloc_local((n, V), dt)
            gf = T.alloc_local((n, V), "float32")
            xv = T.alloc_local((V,), dt)
            yv = T.alloc_local((V,), dt)
            yf = T.alloc_local((V,), "float32")
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            partc = T.alloc_fragment((bt, n * n, NV), "float32")
            partp = T.alloc_fragment((bt, n, NV), "float32")
            redc = T.alloc_fragment((bt, n * n), "float32")
            redp = T.alloc_fragment((bt, n), "float32")
            T.clear(partc)
            T.clear(partp)
            for ch in T.serial(NCH):
                for t, cv in T.Parallel(bt, NV):
                    tok = by * bt + t
                    col = ch * bc + cv * V
                    if tok < Tn and col < C:
                        for i in T.unroll(n):
                            for v in T.vectorized(V):
                                gv[i, v] = g[tok, i, col + v]
                        for v in T.vectorized(V):
                            yv[v] = y[tok, col + v]
                        for i in T.unroll(n):
                            for v in T.vectorized(V):
                                gf[i, v] = T.cast(gv[i, v], "float32")
                        for v in T.vectorized(V):
                            yf[v] = T.cast(yv[v], "float32")
                        # d_y = sum_i post_i g_i ; d_post_i += <g_i, y>
                        for v in T.vectorized(V):
                            acc[v] = 0.0
                        for i in T.unroll(n):
                            for v in T.serial(V):
                                acc[v] += post[tok, i] * gf[i, v]
                                partp[t, i, cv] += gf[i, v] * yf[v]
                        for v in T.vectorized(V):
                            ov[v] = T.cast(acc[v], dt)
                        for v in T.vectorized(V):
                            dy[tok, col + v] = ov[v]
                        # d_x_j = sum_i comb[j, i] g_i ; d_comb[j, i] += <x_j, g_i>
                        for j in T.unroll(n):
                            for v in T.vectorized(V):
                                xv[v] = residual[tok, j, col + v]
                            for v in T.vectorized(V):
                                acc[v] = 0.0
                            for i in T.unroll(n):
                                for v in T.serial(V):
                                    acc[v] += comb[tok, j, i] * gf[i, v]
                                    partc[t, j * n + i, cv] += T.cast(xv[v], "float32") * gf[i, v]
                            for v in T.vectorized(V):
                                ov[v] = T.cast(acc[v], dt)
                            for v in T.vectorized(V):
                                dx[tok, j, col + v] = ov[v]
            # dcomb, dpost = sums over the vectors of the partials (fixed order: deterministic)
            T.reduce_sum(partc, redc, dim=2)
            T.reduce_sum(partp, redp, dim=2)
            for t, r in T.Parallel(bt, n * n):
                if by * bt + t < Tn:
                    dcomb[by * bt + t, r // n, r % n] = redc[t, r]
            for t, i in T.Parallel(bt, n):
                if by * bt + t < Tn:
                    dpost[by * bt + t, i] = redp[t, i]

    return post_bwd


def _build_expand_fwd(n, C, dtype, cfg):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NIT = (bt * NV) // th
    Tn = T.dynamic("T")

    @T.prim_func
    def expand_fwd(h: T.Tensor((Tn, C), dt),           # input
                   out: T.Tensor((Tn, n, C), dt)):     # output
        with T.Kernel(T.ceildiv(Tn, bt), T.ceildiv(C, bc), threads=th) as (by, bx):
            hv = T.alloc_local((V,), dt)
            tx = T.get_thread_binding(0)
            for it in T.serial(NIT):
                # consecutive threads take consecutive vectors of a row: coalesced 16-byte accesses
                idx = it * th + tx
                tok = by * bt + idx // NV
                col = bx * bc + (idx % NV) * V
                if tok < Tn and col < C:
                    # out[t, i, c] = h[t, c] for every stream i
                    for v in T.vectorized(V):
                        hv[v] = h[tok, col + v]
                    for i in T.unroll(n):
                        for v in T.vectorized(V):
                            out[tok, i, col + v] = hv[v]

    return expand_fwd


def _build_expand_bwd(n, C, dtype, cfg):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    NV = bc // V
    NIT = (bt * NV) // th
    Tn = T.dynamic("T")

    @T.prim_func
    def expand_bwd(g: T.Tensor((Tn, n, C), dt),        # gradient in
                   dh: T.Tensor((Tn, C), dt)):         # gradient out
        with T.Kernel(T.ceildiv(Tn, bt), T.ceildiv(C, bc), threads=th) as (by, bx):
            gv = T.alloc_local((V,), dt)
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            tx = T.get_thread_binding(0)
            for it in T.serial(NIT):
                # consecutive threads take consecutive vectors of a row: coalesced 16-byte accesses
                idx = it * th + tx
                tok = by * bt + idx // NV
                col = bx * bc + (idx % NV) * V
                if tok < Tn and col < C:
                    # dh[t, c] = sum_i g[t, i, c]
                    for v in T.vectorized(V):
                        acc[v] = 0.0
                    for i in T.unroll(n):
                        for v in T.vectorized(V):
                            gv[v] = g[tok, i, col + v]
                        for v in T.vectorized(V):
                            acc[v] += T.cast(gv[v], "float32")
                    for v in T.vectorized(V):
                        ov[v] = T.cast(acc[v], dt)
                    for v in T.vectorized(V):
                        dh[tok, col + v] = ov[v]

    return expand_bwd


for _name, _op, _build in (("pre_apply_mix_fwd", "pre_apply_mix", _build_pre_apply_fwd),
                           ("pre_apply_mix_bwd", "pre_apply_mix_bwd", _build_pre_apply_bwd),
                           ("post_fwd", "post", _build_post_fwd),
                           ("post_bwd", "post_bwd", _build_post_bwd),
                           ("expand_fwd", "expand", _build_expand_fwd),
                           ("expand_bwd", "expand_bwd", _build_expand_bwd)):
    kernel_def(KernelDef(_name, _op, _build, KEYS))
kernel_def(KernelDef("collapse_norm", "mhc_head_sp", _build_collapse_norm, COLLAPSE_NORM_KEYS,
                     aot_config=collapse_norm_config))


# -- launch wrappers (torch_ref signatures + the config the core resolved) -------------------------
from .common import get_kernel  # noqa: E402


def pre_apply_mix_fwd(residual, pre_mix, *, config, out=None):
    Tt, n, C = residual.shape
    out = residual.new_empty((Tt, C)) if out is None else out
    if Tt == 0:
        return out
    get_kernel("pre_apply_mix_fwd", n, C, residual.dtype, config, residual.device)(residual, pre_mix, out)
    return out


def collapse_norm_fwd(residual, pre, out_norm_weight, out_norm_eps, *, config):
    """``mhc_head_sp``'s forward -> ``(out (T, C), out_rstd (T,))``: the collapse with ``pre``, then, with a weight,
    the RMSNorm of the rounded collapse in the same kernel (:func:`_build_collapse_norm`; ``out_rstd`` its rho);
    without one ``pre_apply_mix`` and ``out_rstd`` ones. ``config``: ``{"pre_apply_mix": ..., "collapse_norm":
    ...}``."""
    Tt, n, C = residual.shape
    if out_norm_weight is None:
        return (pre_apply_mix_fwd(residual, pre, config=config["pre_apply_mix"]),
                torch.ones((Tt,), dtype=torch.float32, device=residual.device))
    out = residual.new_empty((Tt, C))
    out_rstd = pre.new_empty((Tt,))
    if Tt == 0:
        return out, out_rstd
    get_kernel("collapse_norm", n, C, residual.dtype, config["collapse_norm"], residual.device)(
        residual, pre, out_norm_weight.contiguous(), out, out_rstd, float(out_norm_eps))   # float32 (the op's rule)
    return out, out_rstd


def pre_apply_mix_bwd(grad, residual, pre_mix, *, config, write_dx=True):
    """-> (d_residual, d_pre_mix); with ``write_dx=False`` d_residual is left unwritten (the fused
    mhc_pre/mhc_head backward adds that term inside the projection's d_x kernel instead)."""
    Tt, n, C = residual.shape
    dx = torch.empty_like(residual)  # unwritten (and cheap: no traffic) when write_dx is False
    dmix = pre_mix.new_empty((Tt, n))
    if Tt == 0:
        return dx, dmix
    consts = {} if write_dx else {"write_dx": False}
    get_kernel("pre_apply_mix_bwd", n, C, residual.dtype, config, residual.device, **consts)(
        grad, residual, pre_mix, dx, dmix)
    return dx, dmix


def stream_weight_grad(grad, residual, *, config):
    """d_w[t, i] = <grad[t], residual[t, i]> (T, n) float32: pre_apply_mix_bwd without d_residual (the composites'
    backward adds that term inside norm_fn_bwd's d_x kernel). ``config``: pre_apply_mix_bwd's."""
    Tt, n, _ = residual.shape
    unread = grad.new_empty((Tt, n), dtype=torch.float32)  # the pre-mix only d_residual would need
    return pre_apply_mix_bwd(grad, residual, unread, config=config, write_dx=False)[1]


def post_fwd(layer_output, residual, post_mix, comb_mix, *, config, out=None):
    Tt, n, C = residual.shape
    out = torch.empty_like(residual) if out is None else out
    if Tt == 0:
        return out
    get_kernel("post_fwd", n, C, residual.dtype, config, residual.device)(
        layer_output, residual, post_mix, comb_mix, out)
    return out


def post_bwd(grad, layer_output, residual, post_mix, comb_mix, *, config):
    Tt, n, C = residual.shape
    dy = torch.empty_like(layer_output)
    dx = torch.empty_like(residual)
    dpost = post_mix.new_empty((Tt, n))
    dcomb = comb_mix.new_empty((Tt, n, n))
    if Tt == 0:
        return dy, dx, dpost, dcomb
    get_kernel("post_bwd", n, C, residual.dtype, config, residual.device)(
        grad, layer_output, residual, post_mix, comb_mix, dy, dx, dpost, dcomb)
    return dy, dx, dpost, dcomb


def expand_fwd(hidden, n, *, config):
    Tt, C = hidden.shape
    out = hidden.new_empty((Tt, n, C))
    if Tt == 0:
        return out
    get_kernel("expand_fwd", n, C, hidden.dtype, config, hidden.device)(hidden, out)
    return out


def expand_bwd(grad, *, config):
    Tt, n, C = grad.shape
    out = grad.new_empty((Tt, C))
    if Tt == 0:
        return out
    get_kernel("expand_bwd", n, C, grad.dtype, config, grad.device)(grad, out)
    return out
