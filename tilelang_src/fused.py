"""Fused kernels of the composite ops: ``mhc_pre``'s tail and ``post_pre``'s post + projection.

``mhc_pre`` on the TileLang backend is two launches:

1. the projection main loop (``norm.py``) writes per-split partial dot products
   ``part_mix (S, T, m)`` and sums of squares ``part_sq (S, T)`` -- the residual's first pass;
2. :func:`_build_pre_tail` (this file), per CTA of ``block_T`` tokens x ``block_C`` columns:

   * all threads: ``r = rsqrt(sum_s part_sq / K + norm_eps)``, and for every token of the block
     ``pre_i = sigmoid(r * sum_s part_mix[s, :, i] * scale[0] + base[i]) + pre_eps`` into shared
     memory (a few hundred bytes);
   * threads ``0 .. threads-1`` (the *collapse warps*): ``layer_input[t, c] = sum_i pre_i x[t, i, c]``
     over the CTA's tile, one 16-byte vector per thread per step, float32 accumulation in stream
     order, one rounding -- the residual's second and last pass;
   * one extra warp (the *Sinkhorn warp*, threads ``threads .. threads+31``): for the block's tokens
     ``t`` with ``t % n_cblocks == bx`` (the Sinkhorn work of a token block is spread over the CTAs
     that share it), one lane per token: ``mixes = r * sum_s part_mix``, ``rstd``, ``post``, and the
     ``iters``-round Sinkhorn of the comb logits in registers, written as ``comb``.

   The two roles are different warps of one CTA, so the serial, latency-bound Sinkhorn chain issues
   while the collapse warps wait on HBM; nothing synchronises them after ``pre`` is shared.

``post_pre`` is :func:`_build_post_project` (the new residual computed, written once and projected in
the same main loop) followed by the same tail, which reads the new residual back once.

Memory traffic of the pair (bf16 residual, per token): the residual is read twice (``2 * n * C * 2``
bytes: the projection needs every column of a token before ``pre`` exists, and a token's row does not
fit in shared memory next to a useful token block at C >= 4096), ``layer_input`` written once
(``C * 2``), ``fn`` from L2; the partials, mixes, rstd, post and comb are ``O(S * m)`` floats per token.
The unfused chain (projection -> finalize -> split_mixes -> pre_apply_mix) moves the same residual
bytes in four launches, with the Sinkhorn kernel serialised between the residual's two passes.

The arithmetic is the unfused chain's, written once: the split reduction (``norm.split_reduce_macros``,
as the finalize kernel), post and the Sinkhorn (``mixes.split_post_comb_macro``, as split_mixes_fwd) and
the collapse (``streaming.collapse_macro``, as pre_apply_mix_fwd) are the same macros, so the fused and
the chained ``mhc_pre`` agree bit for bit.

Configs. These two ops are the TileLang backend's overrides of the shared composites (``backend.py``
registers them). Their configs have named parts: ``{"projection": norm_fn's keys, "tail": pre_apply_mix's
layout}`` for ``mhc_pre``, plus ``"post"`` (post's layout, used only when the projection is a tensor-core
one) for ``post_pre``. The tail kernel takes the tail's ``block_T``, ``block_C``, ``threads`` (collapse
threads; the CTA has one more warp) and ``vec``, and the projection's ``split_K`` (the partials' own count).
The post + projection kernel takes the projection's keys (``block_T``, ``block_K``, ``thread_T``,
``thread_M``, ``split_K``; ``mma`` must be "fma").
"""

import torch

from . import norm, streaming
from .common import KernelDef, Shape, cdiv, dtype_name, kernel_def, max_vec
from .mixes import split_post_comb_macro
from .norm import split_reduce_macros

TAIL_KEYS = ("block_T", "block_C", "threads", "vec", "split_K")
SINKHORN_WARP = 32


def default_config(op: str, s: Shape) -> dict:
    """``mhc_pre``: ``{"projection": norm_fn's default, "tail": pre_apply_mix's layout}``; ``post_pre``: the same
    plus ``"post"`` (post's layout, for a tensor-core projection, which runs post separately)."""
    cfg = {"projection": norm.default_config("norm_fn", s), "tail": streaming.default_config("pre_apply_mix", s)}
    if op == "post_pre":
        cfg["post"] = streaming.default_config("post", s)
    return cfg


def config_space(op: str, s: Shape) -> list[dict]:
    """The default, plus the tail's streaming layouts (``pre_apply_mix``'s space) at the default projection; the
    projection is tuned as norm_fn's own op."""
    d = default_config(op, s)
    out = [d]
    for c in streaming.config_space("pre_apply_mix", s):
        cand = dict(d, tail=c)
        if cand not in out:
            out.append(cand)
    return out


def tail_kernel_config(cfg: dict) -> dict:
    """The tail kernel's flat config: the tail's layout and the projection's split count."""
    return dict(cfg["tail"], split_K=cfg["projection"]["split_K"])


def sinkhorn_passes(block_T: int, n_cblocks: int) -> int:
    """Tokens per Sinkhorn-warp lane: a token block's tokens are dealt round-robin over the ``n_cblocks``
    CTAs that share it, then over the warp's lanes."""
    return cdiv(cdiv(block_T, n_cblocks), SINKHORN_WARP)


def sinkhorn_token(cblock, lane, q, n_cblocks):
    """Block-local token that lane ``lane`` of the Sinkhorn warp of hidden block ``cblock`` takes on pass ``q``
    (valid when below ``block_T``). Works on ints and on TIR expressions alike (the kernel uses it)."""
    return cblock + n_cblocks * (q * SINKHORN_WARP + lane)


def tail_min_blocks(n: int, threads: int) -> int:
    """CTAs per SM the tail kernel asks ptxas to fit (``__launch_bounds__``' second argument).

    Left alone, ptxas gives the kernel ~125 registers at n = 4 (the collapse alone needs 40, the Sinkhorn
    warp alone 56), which would cap an SM at 3 CTAs = 12 collapse warps -- too few bytes in flight for a
    memory-bound stream. Asking for a register budget of 48 (n <= 4) keeps them spill-free (checked by
    the compile tests) at 8 CTAs of 160 threads; n = 8's 64-float Sinkhorn matrix needs ~144.
    """
    budget = 48 if n <= 4 else 144
    return max(1, min(65536 // (budget * threads), 2048 // threads))


def _build_pre_tail(n, C, dtype, cfg, iters=20):
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    S = cfg["split_K"]
    if bc % V or (bt * (bc // V)) % th:
        raise ValueError(f"mhc_pre tail: block_T={bt}, block_C={bc}, vec={V} must tile threads={th} exactly")
    m = n * (n + 2)
    nn = n * n
    K = n * C
    NV = bc // V
    NIT = (bt * NV) // th           # collapse steps per thread
    NCB = cdiv(C, bc)               # CTAs sharing a token block (its Sinkhorn work is spread over them)
    NSK = sinkhorn_passes(bt, NCB)  # Sinkhorn tokens per lane
    NPRE = cdiv(bt * n, th + SINKHORN_WARP)
    Tn = T.dynamic("T")
    split_sum, split_rstd = split_reduce_macros(S, K)        # as norm_fn's finalize kernel
    split_post_comb = split_post_comb_macro(n)               # as split_mixes_fwd
    collapse = streaming.collapse_macro(n, V, dt)            # as pre_apply_mix_fwd

    @T.prim_func
    def mhc_pre_tail(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # inputs
                     scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                     x: T.Tensor((Tn, n, C), dt),
                     layer_input: T.Tensor((Tn, C), dt),                                           # outputs
                     post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                     mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),    # saved for bwd
                     norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,             # constants
                     sinkhorn_eps: T.float32):
        with T.Kernel(NCB, T.ceildiv(Tn, bt), threads=th + SINKHORN_WARP) as (bx, by):
            T.annotate_min_blocks_per_sm(tail_min_blocks(n, th + SINKHORN_WARP))
            tx = T.get_thread_binding(0)
            pre_s = T.alloc_shared((bt, n), "float32")
            r = T.alloc_var("float32")
            # -- every thread: pre = sigmoid(sum_s part_mix[s, :n] * rstd * scale0 + base[:n]) + pre_eps ----
            for q in T.serial(NPRE):
                idx = q * (th + SINKHORN_WARP) + tx
                if idx < bt * n:
                    tok = by * bt + idx // n
                    i = idx % n
                    if tok < Tn:
                        r = split_rstd(part_sq, tok, norm_eps)
                        pre_s[idx // n, i] = T.sigmoid(split_sum(part_mix, tok, i) * r * scale[0] + base[i]) + pre_eps
            T.sync_threads()
            if tx < th:
                # -- collapse warps: layer_input = sum_i pre_i x_i over this CTA's tile ---------------------
                xv = T.alloc_local((V,), dt)
                acc = T.alloc_local((V,), "float32")
                ov = T.alloc_local((V,), dt)
                for it in T.serial(NIT):
                    idx = it * th + tx
                    tok = by * bt + idx // NV
                    col = bx * bc + (idx % NV) * V
                    if tok < Tn and col < C:
                        collapse(x, layer_input, pre_s, idx // NV, tok, col, xv, acc, ov)
            else:
                # -- Sinkhorn warp: mixes, rstd, post and comb for tokens t = bx + NCB * j of the block -----
                P = T.alloc_local((nn,), "float32")
                den = T.alloc_local((n,), "float32")
                for q in T.serial(NSK):
                    t = sinkhorn_token(bx, tx - th, q, NCB)
                    tok = by * bt + t
                    if t < bt and tok < Tn:
                        # rstd = rsqrt(sum_s part_sq[s] / K + eps);  mixes = (sum_s part_mix[s]) * rstd
                        r = split_rstd(part_sq, tok, norm_eps)
                        rstd[tok] = r
                        for j in T.serial(m):
                            mixes[tok, j] = split_sum(part_mix, tok, j) * r
                        # post = sigmoid(.) * post_mult;  comb = sinkhorn(mixes[2n:] * scale2 + base[2n:])
                        split_post_comb(mixes, scale, base, tok, post, comb, P, den, post_mult, sinkhorn_eps, iters)

    return mhc_pre_tail


def post_cols(n: int, C: int, dtype, block_K: int) -> int:
    """Columns of each stream per main-loop chunk of the fused post + projection kernel: ``block_K / n``
    (the staged tile keeps ``block_K`` rows, as the plain projection's), at least two 16-byte vectors so
    every row segment read is a whole 32-byte sector."""
    return max(block_K // n, 2 * max_vec(dtype, C))


def _build_post_project(n, C, dtype, cfg, rows=None):
    """``post`` fused into the projection main loop (``post_pre``'s first kernel; "fma" projection only).

    Shapes: ``y (T, C)``, ``residual (T, n, C)`` (residual dtype), ``post (T, n)``, ``comb (T, n, n)``,
    ``fn (m, n*C)`` float32 -> ``out (T, n, C)`` (the new residual), ``part_mix (S, T, m)``,
    ``part_sq (S, T)`` float32 (reduced by :func:`_build_pre_tail`).

    A CTA owns ``block_T`` tokens and one column range (``split_K`` ranges of ``C``, all ``n`` streams).
    Per chunk of ``post_cols`` columns each staging thread takes one (token, vector) item: it reads
    ``y`` and the ``n`` residual vectors once, forms ``out_i = post_i y + sum_j comb[j, i] x_j`` in
    float32, rounds once, writes ``out`` (every element by exactly one thread of one CTA) and stages the
    *rounded* values as float32 (the projection sees the stored residual, as the chain's does) in the
    same ``[k, token]`` tile the plain projection uses; the ``thread_T x thread_M`` register tile then
    accumulates dot products and sums of squares from it. Traffic per token: ``y`` and the residual
    read once, the new residual written once -- the chain (post, then the projection) reads the new
    residual back once more (``n * C`` elements). Summation order over K differs from the chain's
    (chunks interleave the streams), so the result agrees to float32 accumulation error, not bit for bit.
    """
    import tilelang.language as T

    from .norm import fma_tile_macros, mix_rows

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bk, TT, TM, S = cfg["block_T"], cfg["block_K"], cfg["thread_T"], cfg["thread_M"], cfg["split_K"]
    if cfg.get("mma", "fma") != "fma":
        raise ValueError("the fused post + projection kernel has the FMA main loop only (mma='fma'); "
                         "post_pre with a tensor-core projection runs post and the projection separately")
    RG = cdiv(m, TM)
    MP = RG * TM
    TG = bt // TT
    threads = TG * RG
    V = max_vec(dtype, C)
    BC = post_cols(n, C, dtype, bk)          # columns per chunk (per stream)
    KR = n * BC                              # staged rows per chunk
    VF = 4 if C % 4 == 0 and BC % 4 == 0 else (2 if C % 2 == 0 and BC % 2 == 0 else 1)
    CS = cdiv(cdiv(C, S), BC) * BC           # columns per split, whole chunks
    NCH = CS // BC
    NVC = BC // V                            # vectors per stream row per chunk
    XL = cdiv(bt * NVC, threads)
    FL = cdiv(MP * n * (BC // VF), threads)
    Tn = T.dynamic("T")
    accumulate, store_partials = fma_tile_macros(TT, TM, m, Tn)

    @T.prim_func
    def post_project(y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),              # inputs
                     post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                     fn: T.Tensor((m, K), "float32"),
                     out: T.Tensor((Tn, n, C), dt),                                               # outputs
                     part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32")):
        with T.Kernel(T.ceildiv(Tn, bt), S, threads=threads) as (bx, bs):
            tx = T.get_thread_binding(0)
            xs = T.alloc_shared((KR, bt), "float32")   # transposed: [stream * BC + column, token]
            fs = T.alloc_shared((KR, MP), "float32")   # transposed: [stream * BC + column, row]
            acc = T.alloc_local((TT * TM,), "float32")
            sq = T.alloc_local((TT,), "float32")
            xr = T.alloc_local((TT,), "float32")
            fr = T.alloc_local((TM,), "float32")
            xv = T.alloc_local((n, V), dt)
            yv = T.alloc_local((V,), dt)
            yf = T.alloc_local((V,), "float32")
            nv = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            fv = T.alloc_local((VF,), "float32")
            rg = tx % RG
            tg = tx // RG
            for e in T.unroll(TT * TM):
                acc[e] = 0.0
            for e in T.unroll(TT):
                sq[e] = 0.0
            for ch in T.serial(NCH):
                c0 = bs * CS + ch * BC
                # out_i = post_i y + sum_j comb[j, i] x_j for (token, vector) items, written once and
                # staged rounded
                for it in T.serial(XL):
                    idx = it * threads + tx
                    if idx < bt * NVC:
                        t = idx % bt
                        cv = idx // bt
                        tok = bx * bt + t
                        col = c0 + cv * V
                        if tok < Tn and col < C:
                            for v in T.vectorized(V):
                                yv[v] = y[tok, col + v]
                            for j in T.unroll(n):
                                for v in T.vectorized(V):
                                    xv[j, v] = residual[tok, j, col + v]
                            for v in T.vectorized(V):
                                yf[v] = T.cast(yv[v], "float32")
                            for i in T.unroll(n):
                                for v in T.vectorized(V):
                                    nv[v] = post[tok, i] * yf[v]
                                for j in T.unroll(n):
                                    for v in T.vectorized(V):
                                        nv[v] += comb[tok, j, i] * T.cast(xv[j, v], "float32")
                                for v in T.vectorized(V):
                                    ov[v] = T.cast(nv[v], dt)
                                for v in T.vectorized(V):
                                    out[tok, i, col + v] = ov[v]
                                for v in T.unroll(V):
                                    xs[i * BC + cv * V + v, t] = T.cast(ov[v], "float32")
                        else:
                            for i in T.unroll(n):
                                for v in T.unroll(V):
                                    xs[i * BC + cv * V + v, t] = 0.0
                # fn's rows for the same columns of every stream (zero past C and in the padded rows)
                for it in T.serial(FL):
                    idx = it * threads + tx
                    if idx < MP * n * (BC // VF):
                        kv = idx % (n * (BC // VF))
                        j = idx // (n * (BC // VF))
                        i = kv // (BC // VF)
                        cc = (kv % (BC // VF)) * VF
                        if j < m and c0 + cc < C:
                            for v in T.vectorized(VF):
                                fv[v] = fn[j, i * C + c0 + cc + v]
                            for v in T.unroll(VF):
                                fs[i * BC + cc + v, j] = fv[v]
                        else:
                            for v in T.unroll(VF):
                                fs[i * BC + cc + v, j] = 0.0
                T.sync_threads()
                # acc[t, j] += sum_k out[t, k] * fn[j, k];  sq[t] += sum_k out[t, k]^2   (this chunk's k)
                accumulate(xs, fs, KR, xr, fr, acc, sq, tg, rg)
                T.sync_threads()
            store_partials(part_mix, part_sq, acc, sq, bx * bt, bs, tg, rg)

    return post_project


def _iters(s: Shape) -> dict:
    return {"iters": 20}


kernel_def(KernelDef("mhc_pre_tail", "mhc_pre", _build_pre_tail, TAIL_KEYS, _iters,
                     aot_config=lambda s: tail_kernel_config(default_config("mhc_pre", s))))
kernel_def(KernelDef("post_project", "norm_fn", _build_post_project, ("block_T", "block_K", "thread_T", "thread_M",
                                                                        "split_K", "mma")))


# -- launch wrappers: the backend's overrides of the mhc_pre and post_pre composites ----------------------
def mhc_pre_tail(part_mix, part_sq, scale, base, residual, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, *,
                 config):
    """-> (layer_input, post, comb, mixes, rstd) from the projection's split partials.

    ``config``: the tail kernel's flat config (:func:`tail_kernel_config`); its split count must be the
    partials' own.
    """
    from .common import get_kernel

    Tt, n, C = residual.shape
    S, _, m = part_mix.shape
    if config["split_K"] != S:
        raise ValueError(f"mhc_pre tail: config split_K={config['split_K']} but the partials have {S} splits")
    layer_input = residual.new_empty((Tt, C))
    post = part_mix.new_empty((Tt, n))
    comb = part_mix.new_empty((Tt, n, n))
    mixes = part_mix.new_empty((Tt, m))
    rstd = part_mix.new_empty((Tt,))
    if Tt == 0:
        return layer_input, post, comb, mixes, rstd
    get_kernel("mhc_pre_tail", n, C, residual.dtype, config, residual.device, iters=int(iters))(
        part_mix, part_sq, scale, base, residual, layer_input, post, comb, mixes, rstd,
        float(norm_eps), float(pre_eps), float(post_mult), float(sinkhorn_eps))
    return layer_input, post, comb, mixes, rstd


def mhc_pre_fwd(residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, *,
                config):
    """mhc_pre in two launches -> (layer_input, post_mix, comb_mix, mixes, rstd): the projection's split
    partials, then the fused tail (reduce, split, Sinkhorn beside the collapse)."""
    part_mix, part_sq = norm.norm_fn_partials(residual, fn, norm_weight, config=config["projection"])
    return mhc_pre_tail(part_mix, part_sq, scale, base, residual, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps,
                        config=tail_kernel_config(config))


def post_project(layer_output, residual, post_mix, comb_mix, fn, norm_weight, *, config):
    """-> (new_residual, part_mix (S, T, m), part_sq (S, T)): post fused into the projection's main loop
    (``config``: the projection's, "fma" only)."""
    from .common import get_kernel

    Tt, n, C = residual.shape
    m = fn.shape[0]
    S = config["split_K"]
    out = torch.empty_like(residual)
    pm = fn.new_empty((S, Tt, m))
    ps = fn.new_empty((S, Tt))
    if Tt == 0:
        return out, pm, ps
    get_kernel("post_project", n, C, residual.dtype, config, residual.device)(
        layer_output, residual, post_mix, comb_mix, norm._fold(fn, norm_weight), out, pm, ps)
    return out, pm, ps


def post_pre_fwd(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, norm_eps, pre_eps,
                 post_mult, iters, sinkhorn_eps, *, config):
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd) of the next sublayer.

    Two launches with the default ("fma") projection: post fused into the projection's main loop (the new
    residual written once and projected from registers), then mhc_pre's fused tail (the collapse reads the
    new residual back once). A tensor-core projection runs post (``config["post"]``), then mhc_pre."""
    if config["projection"]["mma"] != "fma":
        new_residual = streaming.post_fwd(layer_output, residual, post_mix, comb_mix, config=config["post"])
        return (new_residual,) + mhc_pre_fwd(new_residual, fn, scale, base, norm_weight, norm_eps, pre_eps,
                                             post_mult, iters, sinkhorn_eps, config=config)
    new_residual, part_mix, part_sq = post_project(layer_output, residual, post_mix, comb_mix, fn, norm_weight,
                                                   config=config["projection"])
    return (new_residual,) + mhc_pre_tail(part_mix, part_sq, scale, base, new_residual, norm_eps, pre_eps,
                                          post_mult, iters, sinkhorn_eps, config=tail_kernel_config(config))
