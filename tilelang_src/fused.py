"""Fused kernels of the composite ops: ``mhc_pre``'s tails and ``post_pre``'s post + projection.

Every forward boundary on the TileLang backend (``mhc_pre``, ``post_pre``, ``mhc_pre_sp``, ``post_pre_sp``,
with or without the sublayer's norm) is two device launches and no torch-side ones (no fold, cast, fill
or copy: ``norm_weight`` is folded into ``fn`` by the projection as it stages it, ``out_rstd`` is written
by the tail, placeholders are ``torch.empty``; tests/test_decode.py counts them) -- also with the FP8 copy
of the layer input (``fp8_group`` 128 or 32, contract §15), which the tail writes (see *FP8 copy* below) instead
of a third launch (``quantize_fp8``). ``mhc_pre``:

1. the projection main loop (``norm.py``) writes per-split partial dot products
   ``part_mix (S, T, m)`` and sums of squares ``part_sq (S, T)`` -- the residual's first pass;
2. without the sublayer's norm, :func:`_build_pre_tail` (this file), per CTA of ``block_T`` tokens x
   ``block_C`` columns:

   * all threads: ``r = rsqrt(sum_s part_sq / K + norm_eps)``, and for every token of the block
     ``pre_i = sigmoid(r * sum_s part_mix[s, :, i] * scale[0] + base[i]) + pre_eps`` into shared
     memory (a few hundred bytes);
   * threads ``0 .. threads-1`` (the *collapse warps*): ``layer_input[t, c] = sum_i pre_i x[t, i, c]``
     over the CTA's tile, one 16-byte vector per thread per step, float32 accumulation in stream
     order, one rounding -- the residual's second and last pass;
   * one extra warp (the *Sinkhorn warp*, threads ``threads .. threads+31``): for the block's tokens
     ``t`` with ``t % n_cblocks == bx`` (the Sinkhorn work of a token block is spread over the CTAs
     that share it), one lane per token: ``mixes = r * sum_s part_mix``, ``rstd``, ``post``, and the
     ``iters``-round Sinkhorn of the comb logits in registers, written as ``comb``; ``out_rstd = 1``.

   The two roles are different warps of one CTA, so the serial, latency-bound Sinkhorn chain issues
   while the collapse warps wait on HBM; nothing synchronises them after ``pre`` is shared.

   With the sublayer's norm (``out_norm_weight``) the second launch is :func:`_build_pre_norm_tail`
   instead: the same roles, but a CTA owns ``block_T`` tokens and their whole rows (the norm's statistic
   needs every column of a token's collapse), laid out as ``streaming.collapse_norm``: the collapse
   threads store ``u = round(sum_i pre_i x_i)`` and sum the rounded ``u^2``, one more barrier (which also
   waits for the Sinkhorn warp), then ``rho = rsqrt(mean(u^2) + out_norm_eps)`` and each thread rewrites the
   vectors it stored as ``round(u * rho * w)``.

``post_pre`` is :func:`_build_post_project` (the new residual computed, written once and projected in
the same main loop) followed by the same tail (either one), which reads the new residual back once. With a
tensor-core projection (``mma`` != "fma", not a default) ``post_pre`` is post, then ``mhc_pre``: three
launches, and the fold is a torch multiply in front of the projection (four).

Memory traffic of the pair (bf16 residual, per token): the residual is read twice (``2 * n * C * 2``
bytes: the projection needs every column of a token before ``pre`` exists, and a token's row does not
fit in shared memory next to a useful token block at C >= 4096), ``layer_input`` written once
(``C * 2``; with the sublayer's norm written, re-read from cache and written again: ``3 * C * 2``), ``fn``
(and ``norm_weight``) from L2; the partials, mixes, rstd, post and comb are ``O(S * m)`` floats per token.
The unfused chain (projection -> finalize -> split_mixes -> pre_apply_mix [-> the norm]) moves the same
residual bytes in four (five) launches, with the Sinkhorn kernel serialised between the residual's two
passes.

FP8 copy (``fp8_group`` > 0, a build-time constant of the tails -- 0, the default, builds the plain kernels
with their plain cache keys). Once the CTA has stored the final values of its part of the layer input (the
collapse in :func:`_build_pre_tail`, the rewrite in :func:`_build_pre_norm_tail` and the normalising
:func:`_build_pre_sp_tail`), a barrier of the whole CTA (the Sinkhorn warp included; it makes the CTA's global
stores visible to all its threads), then its threads quantise the groups of the tokens and columns it owns,
one (token, group) per thread and step, re-reading the layer input from L1/L2: ``fp8.quantize_group_macro``,
the ``quantize_fp8`` kernel's own body, so codes and scales are its bits. A CTA that owns a column tile needs
whole groups in it (``block_C`` a multiple of the group: true of every default and space config, whose
``block_C`` is a power of two >= min(next_pow2(C), 256); another config raises ValueError). The
non-normalising single-pass tail, whose layer input the projection wrote, gets ``threads`` quantising threads
beside its Sinkhorn warp (column blocks as the normalising one; no barrier). Extra traffic per token: ``C``
code bytes and ``4 * C / group`` scale bytes written, and the layer input re-read (from cache, or L2/DRAM in
the non-normalising single-pass tail) -- against ``quantize_fp8``'s launch reading it from DRAM.

The arithmetic is the unfused chain's, written once: the split reduction (``norm.split_reduce_macros``,
as the finalize kernel), post and the Sinkhorn (``mixes.split_post_comb_macro``, as split_mixes_fwd), the
collapse (``streaming.collapse_macro``, as pre_apply_mix_fwd) and the norm's statistic and rewrite
(``streaming.collapse_norm_macros``, as collapse_norm) are the same macros, so the fused and the chained
``mhc_pre`` agree bit for bit, with and without the sublayer's norm.

The single-pass ops (contract §14, :func:`_build_project` with a collapse, then
:func:`_build_pre_sp_tail`) are two launches as well: the residual read once by the projection, which also
writes the collapse; the tail finalises the coefficients and, with the norm, rewrites the layer input in place.

Configs. These ops are the TileLang backend's overrides of the shared composites (``backend.py``
registers them). Their configs have named parts: ``{"projection": norm_fn's keys, "tail": pre_apply_mix's
layout}`` for ``mhc_pre`` and ``post_pre``, plus ``"collapse_norm"`` (collapse_norm's layout: the norm tail's)
and, for ``post_pre``, ``"post"`` (post's layout, used only when the projection is a tensor-core one). The tail
kernel takes the tail's ``block_T``, ``block_C``, ``threads`` (collapse threads; the CTA has one more warp) and
``vec``, and the projection's ``split_K`` (the partials' own count); the norm tail takes ``collapse_norm``'s
``block_T``, ``threads``, ``vec`` and the same ``split_K``. The post + projection kernel takes the projection's
keys (``block_T``, ``block_K``, ``thread_T``, ``thread_M``, ``split_K``; ``mma`` must be "fma").
"""

import torch

from mhc_kernels.specs import FP8_GROUPS, fp8_scale_dtype, stream_count

from . import norm, streaming
from .common import KernelDef, Shape, cdiv, dtype_name, kernel_def, max_vec
from .fp8 import scale_dtype_name
from .mixes import split_post_comb_macro
from .norm import split_reduce_macros

TAIL_KEYS = ("block_T", "block_C", "threads", "vec", "split_K")
SINKHORN_WARP = 32


def default_config(op: str, s: Shape) -> dict:
    """``mhc_pre``, ``mhc_pre_sp``, ``post_pre_sp``: ``{"projection": norm_fn's default, "tail": pre_apply_mix's
    layout}``; ``mhc_pre`` and ``post_pre`` also ``"collapse_norm"`` (the layout of the tail with the sublayer's
    norm, :func:`_build_pre_norm_tail`), and ``post_pre`` ``"post"`` (post's layout, for a tensor-core projection,
    which runs post separately)."""
    cfg = {"projection": norm.default_config("norm_fn", s), "tail": streaming.default_config("pre_apply_mix", s)}
    if op == "post_pre":
        cfg["post"] = streaming.default_config("post", s)
    if op in ("mhc_pre", "post_pre"):
        cfg["collapse_norm"] = streaming.default_config("collapse_norm", s)
    return cfg


def config_space(op: str, s: Shape) -> list[dict]:
    """The default, plus the tail's streaming layouts (``pre_apply_mix``'s space) at the default projection; the
    projection is tuned as norm_fn's own op. The norm tail keeps collapse_norm's default layout (every candidate
    carries it): the tuner's calls have no ``out_norm_weight``, so candidates for it would time the same kernel
    and pick among ties (``mhc_head_sp``'s own space tunes that layout)."""
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


def norm_tail_kernel_config(cfg: dict) -> dict:
    """The flat config of the tail with the sublayer's norm: ``collapse_norm``'s layout and the projection's split
    count."""
    return dict(cfg["collapse_norm"], split_K=cfg["projection"]["split_K"])


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


def norm_tail_min_blocks(n: int, threads: int, fp8: bool = False) -> int:
    """The same for the tail with the sublayer's norm (:func:`_build_pre_norm_tail`), whose collapse threads keep
    ``collapse_norm``'s layout: its rewrite loop wants ~56 registers (48 spills a word), so 7 CTAs of 160
    threads per SM at n <= 4 (28 collapse warps, plenty of 16-byte loads in flight); n = 8 as the tail. With the
    FP8 copy (``fp8``) 56 spills two words (C = 7168, or several quantising passes per thread), so 64: 6 CTAs
    (24 collapse warps)."""
    budget = (64 if fp8 else 56) if n <= 4 else 144
    return max(1, min(65536 // (budget * threads), 2048 // threads))


def _check_fp8(kernel: str, C: int, fp8_group: int, tile_C: int = 0, tile_key: str = ""):
    """The FP8 copy's build-time constraints: ``fp8_group`` 0, 32 or 128 dividing ``C`` and, where a CTA owns a
    column tile of ``tile_C`` columns (config key ``tile_key``), whole groups per tile."""
    if fp8_group not in (0,) + FP8_GROUPS:
        raise ValueError(f"{kernel}: fp8_group must be 0 (no FP8 copy) or one of {FP8_GROUPS}; got {fp8_group}")
    if fp8_group and C % fp8_group:
        raise ValueError(f"{kernel}: fp8_group={fp8_group} must divide C={C}")
    if fp8_group and tile_C and tile_C % fp8_group:
        raise ValueError(f"{kernel}: with an FP8 copy a CTA quantises the groups of its column tile, so the "
                         f"config's {tile_key}={tile_C} must be a multiple of fp8_group={fp8_group}")


def fp8_tile_macro(group: int, V: int, dt: str, rows: int, cols: int, nthreads: int, C: int, Tn):
    """``fp8_tile(x, codes, scales, tok0, g0, tid)``: the FP8 copy (``fp8.quantize_group_macro``, the
    ``quantize_fp8`` kernel's body) of the groups of a ``rows`` x ``cols`` tile of ``x (T, C)`` -- tokens from
    ``tok0``, groups from ``g0`` (``cols`` a multiple of ``group``) -- by ``nthreads`` threads (``tid``), one
    (token, group) per thread and step, as ``quantize_fp8`` lays them out; rows past ``T`` and groups past ``C``
    are masked. ``Tn`` (the kernel's symbolic token count) is closed over."""
    import tilelang.language as T

    from .fp8 import quantize_group_macro

    GPR = cols // group             # groups per tile row
    NG = C // group                 # groups per token
    NQ = cdiv(rows * GPR, nthreads)
    quantize_group = quantize_group_macro(group, V, dt)

    @T.macro
    def fp8_tile(x, codes, scales, tok0, g0, tid):
        for q in T.serial(NQ):
            idx = q * nthreads + tid
            if idx < rows * GPR and tok0 + idx // GPR < Tn and g0 + idx % GPR < NG:
                quantize_group(x, codes, scales, tok0 + idx // GPR, g0 + idx % GPR)

    return fp8_tile


def _build_pre_tail(n, C, dtype, cfg, iters=20, fp8_group=0):
    """``mhc_pre``'s tail without the sublayer's norm, from the projection's split partials (module docstring).

    Shapes: ``part_mix (S, T, m)``, ``part_sq (S, T)``, ``scale (3,)``, ``base (m,)`` float32, ``x (T, n, C)``
    -> ``layer_input (T, C)`` (residual dtype), ``post (T, n)``, ``comb (T, n, n)``, ``mixes (T, m)``, ``rstd``,
    ``out_rstd (T,)`` float32; with ``fp8_group`` (32 or 128, a build-time constant; 0: none) also
    ``fp8_codes (T, C)`` uint8 (the float8_e4m3fn bytes) and ``fp8_scales (T, C / fp8_group)`` (float32, or
    E8M0 bytes for 32).

    A CTA owns ``block_T`` tokens x ``block_C`` columns: ``pre`` into shared memory (all threads), a barrier, then
    the collapse warps stream the tile while the Sinkhorn warp finalises the coefficients. With an FP8 copy a
    second barrier (every thread, the Sinkhorn warp's included: the CTA's stores of the tile are then visible to
    all its threads) and the CTA's threads quantise the tile's groups (``block_C`` a multiple of the group), one
    (token, group) per thread, re-reading the layer input they just stored (L1/L2 hits) -- the ``quantize_fp8``
    kernel's arithmetic (``fp8.quantize_group_macro``), so the same bits.

    Traffic per token: the partials, ``x`` once (``n * C``), ``layer_input`` written (``C``); with FP8 also
    ``C`` code bytes and ``4 * C / group`` scale bytes written and the layer input re-read from cache.
    """
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    S = cfg["split_K"]
    if bc % V or (bt * (bc // V)) % th:
        raise ValueError(f"mhc_pre tail: block_T={bt}, block_C={bc}, vec={V} must tile threads={th} exactly")
    _check_fp8("mhc_pre tail", C, fp8_group, bc, "block_C (config['tail']['block_C'])")
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
    G8 = C // fp8_group if fp8_group else 1
    S8 = scale_dtype_name(fp8_group)   # the scales' dtype: float32, or uint8 (E8M0 bytes) for 32
    if fp8_group:
        fp8_tile = fp8_tile_macro(fp8_group, V, dt, bt, bc, th + SINKHORN_WARP, C, Tn)   # as quantize_fp8

    @T.macro
    def tail(part_mix, part_sq, scale, base, x, layer_input, post, comb, mixes, rstd, out_rstd, fp8_codes,
             fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps):
        with T.Kernel(T.ceildiv(Tn, bt), NCB, threads=th + SINKHORN_WARP) as (by, bx):
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
                        out_rstd[tok] = 1.0   # no sublayer norm: its rstd is 1 (written here, not a torch fill)
                        for j in T.serial(m):
                            mixes[tok, j] = split_sum(part_mix, tok, j) * r
                        # post = sigmoid(.) * post_mult;  comb = sinkhorn(mixes[2n:] * scale2 + base[2n:])
                        split_post_comb(mixes, scale, base, tok, post, comb, P, den, post_mult, sinkhorn_eps, iters)
            if fp8_group:
                # -- every thread, once the tile is stored: the FP8 copy of its groups, one per thread ----------
                T.sync_threads()
                fp8_tile(layer_input, fp8_codes, fp8_scales, by * bt, bx * (bc // fp8_group), tx)

    if not fp8_group:
        @T.prim_func
        def mhc_pre_tail(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                         scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                         x: T.Tensor((Tn, n, C), dt),
                         layer_input: T.Tensor((Tn, C), dt),                                           # outputs
                         post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                         mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),    # saved for bwd
                         out_rstd: T.Tensor((Tn,), "float32"),
                         norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,             # constants
                         sinkhorn_eps: T.float32):
            tail(part_mix, part_sq, scale, base, x, layer_input, post, comb, mixes, rstd, out_rstd, None, None,
                 norm_eps, pre_eps, post_mult, sinkhorn_eps)

        return mhc_pre_tail

    @T.prim_func
    def mhc_pre_tail_fp8(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                         scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                         x: T.Tensor((Tn, n, C), dt),
                         layer_input: T.Tensor((Tn, C), dt),                                           # outputs
                         post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                         mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),    # saved for bwd
                         out_rstd: T.Tensor((Tn,), "float32"),
                         fp8_codes: T.Tensor((Tn, C), "uint8"), fp8_scales: T.Tensor((Tn, G8), S8),  # FP8
                         norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,             # constants
                         sinkhorn_eps: T.float32):
        tail(part_mix, part_sq, scale, base, x, layer_input, post, comb, mixes, rstd, out_rstd, fp8_codes,
             fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps)

    return mhc_pre_tail_fp8


NORM_TAIL_KEYS = ("block_T", "threads", "vec", "split_K")


def _build_pre_norm_tail(n, C, dtype, cfg, iters=20, fp8_group=0):
    """``mhc_pre``'s tail with the sublayer's RMSNorm (``out_norm_weight``), from the projection's split partials.

    Shapes: ``part_mix (S, T, m)``, ``part_sq (S, T)``, ``scale (3,)``, ``base (m,)`` float32, ``x (T, n, C)``,
    ``out_norm_weight (C,)`` float32 -> ``layer_input (T, C)`` (residual dtype), ``post``, ``comb``, ``mixes``,
    ``rstd``, ``out_rstd`` float32; with ``fp8_group`` (32 or 128, a build-time constant; 0: none) also
    ``fp8_codes (T, C)`` uint8 (the float8_e4m3fn bytes) and ``fp8_scales (T, C / fp8_group)`` (float32, or
    E8M0 bytes for 32).

    A CTA owns ``block_T`` tokens and their whole rows (the norm's statistic needs every column of a token before
    its first normalised value); the layout of its collapse threads is ``collapse_norm``'s (``threads / block_T``
    per token, ``vec``-element vectors, ``streaming.collapse_norm_macros``), plus the Sinkhorn warp:

    * all threads: ``pre`` of the block's tokens from the partials into shared memory, as the tail computes it
      (one (token, stream) value per thread and step: ``split_K`` loads each, never all at once); a barrier;
    * collapse threads (``tx < threads``): ``u = round(sum_i pre_i x_i)`` stored as ``layer_input`` and the sum
      of the rounded ``u^2`` of their vectors into shared memory;
    * the Sinkhorn warp, meanwhile: ``rstd``, ``mixes``, ``post`` and ``comb`` of the block's tokens, one lane
      per token (the tail's Sinkhorn role), while the collapse threads wait on HBM;
    * a second barrier (the token statistics; it also waits for the Sinkhorn warp, which overlaps the collapse,
      the larger phase), then the collapse threads: ``rho = rsqrt(sum u^2 / C + out_norm_eps)`` (partials in
      lane order), ``out_rstd``, and their own vectors rewritten as ``round(u * rho * w)`` (re-read from cache);
    * with an FP8 copy, a third barrier (the rewritten rows visible to every thread of the CTA) and then every
      thread, the Sinkhorn warp's included: the FP8 copy of the block's groups (``block_T * C / fp8_group``), one
      (token, group) per thread and step, re-reading the final layer input from cache -- the ``quantize_fp8``
      kernel's arithmetic (``fp8.quantize_group_macro``), so the same bits. That variant asks for 6 CTAs per SM
      instead of 7 (:func:`norm_tail_min_blocks`: its register budget is 64, not 56).

    The arithmetic is the three-launch chain's (the tail's split reduction and Sinkhorn, ``collapse_norm``'s
    collapse, statistic and rewrite, the same macros), so it equals the chain bit for bit. Traffic per token: the
    partials, ``x`` once (``n * C``), ``layer_input`` written, re-read from cache and written (``3 * C``); with FP8
    also ``C`` code bytes and ``4 * C / group`` scale bytes written and the layer input re-read from cache.
    """
    import tilelang.language as T

    dt = dtype_name(dtype)
    streaming.check_collapse_norm_config(C, cfg)
    _check_fp8("mhc_pre norm tail", C, fp8_group)
    bt, th, V, S = cfg["block_T"], cfg["threads"], cfg["vec"], cfg["split_K"]
    m = n * (n + 2)
    nn = n * n
    K = n * C
    TPT = th // bt                  # collapse threads per token
    NSK = sinkhorn_passes(bt, 1)    # Sinkhorn tokens per lane
    NPRE = cdiv(bt * n, th + SINKHORN_WARP)
    Tn = T.dynamic("T")
    split_sum, split_rstd = split_reduce_macros(S, K)        # as norm_fn's finalize kernel
    split_post_comb = split_post_comb_macro(n)               # as split_mixes_fwd
    collapse_sq, token_rho, normalize = streaming.collapse_norm_macros(n, C, V, TPT, dt, Tn)  # as collapse_norm
    G8 = C // fp8_group if fp8_group else 1
    S8 = scale_dtype_name(fp8_group)   # the scales' dtype: float32, or uint8 (E8M0 bytes) for 32
    if fp8_group:
        fp8_tile = fp8_tile_macro(fp8_group, V, dt, bt, C, th + SINKHORN_WARP, C, Tn)   # as quantize_fp8

    @T.macro
    def tail(part_mix, part_sq, scale, base, x, out_norm_weight, layer_input, post, comb, mixes, rstd, out_rstd,
             fp8_codes, fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps):
        with T.Kernel(T.ceildiv(Tn, bt), threads=th + SINKHORN_WARP) as by:
            T.annotate_min_blocks_per_sm(norm_tail_min_blocks(n, th + SINKHORN_WARP, fp8=bool(fp8_group)))
            tx = T.get_thread_binding(0)
            pre_s = T.alloc_shared((bt, n), "float32")
            part_s = T.alloc_shared((bt, TPT), "float32")
            xv = T.alloc_local((V,), dt)
            acc = T.alloc_local((V,), "float32")
            ov = T.alloc_local((V,), dt)
            P = T.alloc_local((nn,), "float32")
            den = T.alloc_local((n,), "float32")
            r = T.alloc_var("float32")
            rho = T.alloc_var("float32")
            t = tx // TPT
            lane = tx % TPT
            tok = by * bt + t
            # -- every thread: pre = sigmoid(sum_s part_mix[s, :n] * rstd * scale0 + base[:n]) + pre_eps -------
            for q in T.serial(NPRE):
                idx = q * (th + SINKHORN_WARP) + tx
                if idx < bt * n:
                    tp = by * bt + idx // n
                    if tp < Tn:
                        r = split_rstd(part_sq, tp, norm_eps)
                        pre_s[idx // n, idx % n] = T.sigmoid(split_sum(part_mix, tp, idx % n) * r * scale[0]
                                                             + base[idx % n]) + pre_eps
            T.sync_threads()
            if tx < th:
                # -- collapse threads: u = round(sum_i pre_i x_i) stored; the sum of the rounded u^2 -------------
                part_s[t, lane] = collapse_sq(x, layer_input, pre_s, t, tok, lane, xv, acc, ov)
            else:
                # -- Sinkhorn warp: mixes, rstd, post and comb of the block's tokens, one lane per token -------
                for q in T.serial(NSK):
                    ts = sinkhorn_token(0, tx - th, q, 1)
                    tk = by * bt + ts
                    if ts < bt and tk < Tn:
                        # rstd = rsqrt(sum_s part_sq[s] / K + eps);  mixes = (sum_s part_mix[s]) * rstd
                        r = split_rstd(part_sq, tk, norm_eps)
                        rstd[tk] = r
                        for j in T.serial(m):
                            mixes[tk, j] = split_sum(part_mix, tk, j) * r
                        # post = sigmoid(.) * post_mult;  comb = sinkhorn(mixes[2n:] * scale2 + base[2n:])
                        split_post_comb(mixes, scale, base, tk, post, comb, P, den, post_mult, sinkhorn_eps, iters)
            T.sync_threads()
            if tx < th:
                # -- rho = rsqrt(sum of the token's partials (lane order) / C + eps); u rewritten in place ------
                rho = token_rho(part_s, t, out_norm_eps)
                if tok < Tn and lane == 0:
                    out_rstd[tok] = rho
                normalize(layer_input, out_norm_weight, tok, lane, rho, ov)
            if fp8_group:
                # -- every thread, once the rows are rewritten: the FP8 copy of the block's groups ---------------
                T.sync_threads()
                fp8_tile(layer_input, fp8_codes, fp8_scales, by * bt, 0, tx)

    if not fp8_group:
        @T.prim_func
        def mhc_pre_norm_tail(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                              scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                              x: T.Tensor((Tn, n, C), dt), out_norm_weight: T.Tensor((C,), "float32"),
                              layer_input: T.Tensor((Tn, C), dt),                                         # outputs
                              post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                              mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),  # saved for bwd
                              out_rstd: T.Tensor((Tn,), "float32"),
                              norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,          # constants
                              sinkhorn_eps: T.float32, out_norm_eps: T.float32):
            tail(part_mix, part_sq, scale, base, x, out_norm_weight, layer_input, post, comb, mixes, rstd, out_rstd,
                 None, None, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps)

        return mhc_pre_norm_tail

    @T.prim_func
    def mhc_pre_norm_tail_fp8(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                              scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                              x: T.Tensor((Tn, n, C), dt), out_norm_weight: T.Tensor((C,), "float32"),
                              layer_input: T.Tensor((Tn, C), dt),                                         # outputs
                              post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                              mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),  # saved for bwd
                              out_rstd: T.Tensor((Tn,), "float32"),
                              fp8_codes: T.Tensor((Tn, C), "uint8"), fp8_scales: T.Tensor((Tn, G8), S8),  # FP8
                              norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,          # constants
                              sinkhorn_eps: T.float32, out_norm_eps: T.float32):
        tail(part_mix, part_sq, scale, base, x, out_norm_weight, layer_input, post, comb, mixes, rstd, out_rstd,
             fp8_codes, fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps)

    return mhc_pre_norm_tail_fp8


def _build_pre_sp_tail(n, C, dtype, cfg, iters=20, normalize=True, fp8_group=0):
    """``mhc_pre_sp``'s second kernel, from the split partials of :func:`_build_project` (collapse mode).

    Shapes: ``part_mix (S, T, m)``, ``part_sq``, ``part_usq (S, T)`` float32, ``scale (3,)``, ``base (m,)``,
    ``out_norm_weight (C,)`` float32 (not read without ``normalize``), ``layer_input (T, C)`` (residual dtype: the
    rounded collapse ``u``, rewritten in place when normalising) -> ``pre``, ``post (T, n)``, ``comb (T, n, n)``,
    ``mixes (T, m)``, ``rstd``, ``out_rstd (T,)`` float32; with ``fp8_group`` (32 or 128, a build-time constant;
    0: none) also ``fp8_codes (T, C)`` uint8 (the float8_e4m3fn bytes) and ``fp8_scales (T, C / fp8_group)``
    (float32, or E8M0 bytes for 32) of the final layer input.

    * The *Sinkhorn warp* (one lane per token; with ``normalize`` or an FP8 copy a token block's tokens are dealt
      over the ``n_cblocks`` CTAs that share it, as in :func:`_build_pre_tail`): ``rstd`` and ``mixes`` from the
      partials (splits in order), ``pre = sigmoid(mixes[:n] * scale0 + base[:n]) + pre_eps``, ``post`` and the
      Sinkhorn ``comb`` -- the arithmetic of the finalize and split_mixes kernels, so this site's coefficients
      are mhc_pre's for the same partials.
    * With ``normalize`` (an ``out_norm_weight``), first every thread: ``rho = rsqrt(sum_s part_usq[s] / C +
      out_norm_eps)`` per token of the block into shared memory (``out_rstd``); then the *collapse warps*
      (``threads``) rewrite their tile of ``layer_input`` as ``round(u * rho * w)``. With an FP8 copy too, a
      second barrier (the rewritten tile visible to every thread of the CTA, the Sinkhorn warp's included), then
      every thread quantises the tile's groups (``block_C`` a multiple of the group), one (token, group) per
      thread and step, re-reading the layer input from cache.
    * Without a weight the kernel is the Sinkhorn warp alone and ``out_rstd`` is 1; with an FP8 copy the CTA
      also has the ``threads`` quantising threads, which take the tile's groups of the layer input the projection
      wrote (no barrier: nothing in this kernel writes it) while the Sinkhorn warp runs. Either way the FP8 copy
      is the ``quantize_fp8`` kernel's arithmetic (``fp8.quantize_group_macro``), so the same bits.

    Traffic per token: the partials (``S * (m + 2)`` floats) and, when normalising, ``u`` read and the
    normalised layer input written (``2 * C`` elements; the statistic needs every column of the token first);
    with FP8 also ``C`` code bytes and ``4 * C / group`` scale bytes written and the layer input read (from
    cache after the rewrite; from L2 or DRAM without the norm).
    """
    import tilelang.language as T

    dt = dtype_name(dtype)
    bt, bc, th, V = cfg["block_T"], cfg["block_C"], cfg["threads"], cfg["vec"]
    S = cfg["split_K"]
    if normalize and (bc % V or (bt * (bc // V)) % th):
        raise ValueError(f"mhc_pre_sp tail: block_T={bt}, block_C={bc}, vec={V} must tile threads={th} exactly")
    _check_fp8("mhc_pre_sp tail", C, fp8_group, bc, "block_C (config['tail']['block_C'])")
    m = n * (n + 2)
    nn = n * n
    K = n * C
    NV = bc // V
    NIT = (bt * NV) // th
    TH = th if normalize or fp8_group else 0      # collapse / quantising threads (none: the Sinkhorn warp alone)
    NCB = cdiv(C, bc) if normalize or fp8_group else 1
    NSK = sinkhorn_passes(bt, NCB)
    NRHO = cdiv(bt, TH + SINKHORN_WARP)
    Tn = T.dynamic("T")
    split_sum, split_rstd = split_reduce_macros(S, K)        # as norm_fn's finalize kernel
    split_post_comb = split_post_comb_macro(n)               # as split_mixes_fwd
    G8 = C // fp8_group if fp8_group else 1
    S8 = scale_dtype_name(fp8_group)   # the scales' dtype: float32, or uint8 (E8M0 bytes) for 32
    if fp8_group:  # after the rewrite every thread quantises; without it the TH threads, beside the Sinkhorn warp
        fp8_tile = fp8_tile_macro(fp8_group, V, dt, bt, bc, TH + SINKHORN_WARP if normalize else TH, C, Tn)

    @T.macro
    def sinkhorn_role(part_mix, part_sq, scale, base, pre, post, comb, mixes, rstd, out_rstd, lane, bx, by,
                      norm_eps, pre_eps, post_mult, sinkhorn_eps):
        P = T.alloc_local((nn,), "float32")
        den = T.alloc_local((n,), "float32")
        r = T.alloc_var("float32")
        for q in T.serial(NSK):
            t = sinkhorn_token(bx, lane, q, NCB)
            tok = by * bt + t
            if t < bt and tok < Tn:
                # rstd = rsqrt(sum_s part_sq[s] / K + eps);  mixes = (sum_s part_mix[s]) * rstd
                r = split_rstd(part_sq, tok, norm_eps)
                rstd[tok] = r
                for j in T.serial(m):
                    mixes[tok, j] = split_sum(part_mix, tok, j) * r
                # pre = sigmoid(mixes[:n] * scale0 + base[:n]) + pre_eps
                for i in T.unroll(n):
                    pre[tok, i] = T.sigmoid(mixes[tok, i] * scale[0] + base[i]) + pre_eps
                # post = sigmoid(.) * post_mult;  comb = sinkhorn(mixes[2n:] * scale2 + base[2n:])
                split_post_comb(mixes, scale, base, tok, post, comb, P, den, post_mult, sinkhorn_eps, iters)
                if not normalize:
                    out_rstd[tok] = 1.0

    @T.macro
    def tail(part_mix, part_sq, part_usq, scale, base, out_norm_weight, layer_input, pre, post, comb, mixes, rstd,
             out_rstd, fp8_codes, fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps):
        with T.Kernel(T.ceildiv(Tn, bt), NCB, threads=TH + SINKHORN_WARP) as (by, bx):
            tx = T.get_thread_binding(0)
            if normalize:
                T.annotate_min_blocks_per_sm(tail_min_blocks(n, th + SINKHORN_WARP))
                rho_s = T.alloc_shared((bt,), "float32")
                ua = T.alloc_var("float32")
                # -- every thread: rho = rsqrt(sum_s part_usq[s] / C + out_norm_eps) of the block's tokens ------
                for q in T.serial(NRHO):
                    idx = q * (TH + SINKHORN_WARP) + tx
                    if idx < bt and by * bt + idx < Tn:
                        ua = 0.0
                        for sp in T.serial(S):
                            ua += part_usq[sp, by * bt + idx]
                        rho_s[idx] = T.rsqrt(ua / C + out_norm_eps)
                        if bx == 0:
                            out_rstd[by * bt + idx] = rho_s[idx]
                T.sync_threads()
                if tx < TH:
                    # -- collapse warps: layer_input = round(u * rho * out_norm_weight) over this CTA's tile ----
                    uv = T.alloc_local((V,), dt)
                    ov = T.alloc_local((V,), dt)
                    for it in T.serial(NIT):
                        idx = it * TH + tx
                        tok = by * bt + idx // NV
                        col = bx * bc + (idx % NV) * V
                        if tok < Tn and col < C:
                            for v in T.vectorized(V):
                                uv[v] = layer_input[tok, col + v]
                            for v in T.vectorized(V):
                                ov[v] = T.cast(T.cast(uv[v], "float32") * rho_s[idx // NV] * out_norm_weight[col + v],
                                               dt)
                            for v in T.vectorized(V):
                                layer_input[tok, col + v] = ov[v]
                else:
                    sinkhorn_role(part_mix, part_sq, scale, base, pre, post, comb, mixes, rstd, out_rstd, tx - TH,
                                  bx, by, norm_eps, pre_eps, post_mult, sinkhorn_eps)
                if fp8_group:
                    # -- every thread, once the tile is rewritten: the FP8 copy of its groups, one per thread -------
                    T.sync_threads()
                    fp8_tile(layer_input, fp8_codes, fp8_scales, by * bt, bx * (bc // fp8_group), tx)
            elif fp8_group:
                T.annotate_min_blocks_per_sm(tail_min_blocks(n, th + SINKHORN_WARP))
                if tx < TH:
                    # -- quantising threads: the FP8 copy of the tile's groups (the layer input the projection wrote)
                    fp8_tile(layer_input, fp8_codes, fp8_scales, by * bt, bx * (bc // fp8_group), tx)
                else:
                    sinkhorn_role(part_mix, part_sq, scale, base, pre, post, comb, mixes, rstd, out_rstd, tx - TH,
                                  bx, by, norm_eps, pre_eps, post_mult, sinkhorn_eps)
            else:
                sinkhorn_role(part_mix, part_sq, scale, base, pre, post, comb, mixes, rstd, out_rstd, tx, bx, by,
                              norm_eps, pre_eps, post_mult, sinkhorn_eps)

    if not fp8_group:
        @T.prim_func
        def mhc_pre_sp_tail(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                            part_usq: T.Tensor((S, Tn), "float32"),
                            scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                            out_norm_weight: T.Tensor((C,), "float32"),
                            layer_input: T.Tensor((Tn, C), dt),                                 # in / out (normalised)
                            pre: T.Tensor((Tn, n), "float32"), post: T.Tensor((Tn, n), "float32"),   # outputs
                            comb: T.Tensor((Tn, n, n), "float32"),
                            mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),   # saved for bwd
                            out_rstd: T.Tensor((Tn,), "float32"),
                            norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,           # constants
                            sinkhorn_eps: T.float32, out_norm_eps: T.float32):
            tail(part_mix, part_sq, part_usq, scale, base, out_norm_weight, layer_input, pre, post, comb, mixes, rstd,
                 out_rstd, None, None, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps)

        return mhc_pre_sp_tail

    @T.prim_func
    def mhc_pre_sp_tail_fp8(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                            part_usq: T.Tensor((S, Tn), "float32"),
                            scale: T.Tensor((3,), "float32"), base: T.Tensor((m,), "float32"),
                            out_norm_weight: T.Tensor((C,), "float32"),
                            layer_input: T.Tensor((Tn, C), dt),                                 # in / out (normalised)
                            pre: T.Tensor((Tn, n), "float32"), post: T.Tensor((Tn, n), "float32"),   # outputs
                            comb: T.Tensor((Tn, n, n), "float32"),
                            mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),   # saved for bwd
                            out_rstd: T.Tensor((Tn,), "float32"),
                            fp8_codes: T.Tensor((Tn, C), "uint8"), fp8_scales: T.Tensor((Tn, G8), S8),  # FP8
                            norm_eps: T.float32, pre_eps: T.float32, post_mult: T.float32,           # constants
                            sinkhorn_eps: T.float32, out_norm_eps: T.float32):
        tail(part_mix, part_sq, part_usq, scale, base, out_norm_weight, layer_input, pre, post, comb, mixes, rstd,
             out_rstd, fp8_codes, fp8_scales, norm_eps, pre_eps, post_mult, sinkhorn_eps, out_norm_eps)

    return mhc_pre_sp_tail_fp8


def post_cols(n: int, C: int, dtype, block_K: int) -> int:
    """Columns of each stream per main-loop chunk of the fused post + projection kernel: ``block_K / n``
    (the staged tile keeps ``block_K`` rows, as the plain projection's), at least two 16-byte vectors so
    every row segment read is a whole 32-byte sector."""
    return max(block_K // n, 2 * max_vec(dtype, C))


COLLAPSE_MODES = (None, "first", "mix")


def _build_project(n, C, dtype, cfg, rows=None, with_post=True, collapse=None, fold=False):
    """The projection main loop over column chunks of all ``n`` streams, with ``post`` and/or the single-pass
    collapse fused into its staging step ("fma" projection only). Three kernels are built from it:

    * ``post_project`` (``with_post``, no collapse; ``post_pre``'s first kernel): ``y (T, C)``,
      ``residual (T, n, C)``, ``post (T, n)``, ``comb (T, n, n)``, ``fn (m, n*C)``, ``norm_weight (n*C,)`` float32
      -> ``out (T, n, C)`` (the new residual), ``part_mix (S, T, m)``, ``part_sq (S, T)``;
    * ``pre_sp_project`` (no post, ``collapse``; ``mhc_pre_sp``'s first kernel): ``residual``,
      [``prev_pre (T, n)`` float32,] ``fn``, ``norm_weight`` -> ``layer_input (T, C)``, ``part_mix``, ``part_sq``,
      ``part_usq (S, T)``;
    * ``post_pre_sp_project`` (both; ``post_pre_sp``'s first kernel): the union of the two.

    A CTA owns ``block_T`` tokens and one column range (``split_K`` ranges of ``C``, all ``n`` streams).
    Per chunk of ``post_cols`` columns each staging thread takes one (token, vector) item: it reads the
    ``n`` residual vectors once (and ``y``), with ``post`` forms ``out_i = post_i y + sum_j comb[j, i] x_j``
    in float32, rounds once and writes ``out``; it stages the stored values ``s_i`` (the rounded new residual,
    or the residual itself) as float32 in the ``[k, token]`` tile the plain projection uses. With a
    collapse it also forms ``u = sum_i prev_pre_i s_i`` (float32 in stream order, one rounding: the
    arithmetic of ``pre_apply_mix``), or ``u = s_0`` bit for bit (``collapse="first"``, the one-hot pre of the
    first site), writes it as ``layer_input`` and stages the rounded ``u`` in a ``[column, token]`` tile.
    fn's rows for the chunk's columns are staged beside it -- with ``fold``, multiplied by ``norm_weight`` as they
    are (``fn * norm_weight`` rounded once, the product the wrapper's torch fold would make, so no launch of its
    own; without, ``norm_weight`` is a placeholder the kernel never reads).
    The ``thread_T x thread_M`` register tile then accumulates dot products and sums of squares of ``s``,
    and the threads of row group 0 the sum of squares of the rounded ``u`` (its RMSNorm statistic, fixed
    order; the tail adds the splits in order) -- no atomics.

    Traffic per token (bf16): the residual (and ``y``) read once, ``out`` and ``layer_input`` written once;
    ``fn`` (and ``norm_weight``) come from L2; the partials are ``S * (m + 2)`` floats. ``post_pre_sp``:
    ``(2n + 2) * C`` elements, ``mhc_pre_sp``: ``(n + 1) * C``. Summation order over K differs from the plain
    projection's (chunks interleave the streams), so mixes agree with it to float32 accumulation error, not bit
    for bit.
    """
    import tilelang.language as T

    from .norm import fma_tile_macros, mix_rows

    if collapse not in COLLAPSE_MODES:
        raise ValueError(f"collapse must be one of {COLLAPSE_MODES}; got {collapse!r}")
    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bk, TT, TM, S = cfg["block_T"], cfg["block_K"], cfg["thread_T"], cfg["thread_M"], cfg["split_K"]
    if cfg.get("mma", "fma") != "fma":
        raise ValueError("the fused post / collapse + projection kernels have the FMA main loop only (mma='fma'); "
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

    @T.macro
    def main_loop(y, residual, post, comb, prev_pre, fn, norm_weight, out, layer_input, part_mix, part_sq, part_usq):
        with T.Kernel(T.ceildiv(Tn, bt), S, threads=threads) as (bx, bs):
            tx = T.get_thread_binding(0)
            xs = T.alloc_shared((KR, bt), "float32")   # transposed: [stream * BC + column, token]
            fs = T.alloc_shared((KR, MP), "float32")   # transposed: [stream * BC + column, row]
            acc = T.alloc_local((TT * TM,), "float32")
            sq = T.alloc_local((TT,), "float32")
            xr = T.alloc_local((TT,), "float32")
            fr = T.alloc_local((TM,), "float32")
            xv = T.alloc_local((n, V), dt)
            ov = T.alloc_local((V,), dt)
            fv = T.alloc_local((VF,), "float32")
            if fold:
                wv = T.alloc_local((VF,), "float32")
            if with_post:
                yv = T.alloc_local((V,), dt)
                yf = T.alloc_local((V,), "float32")
                nv = T.alloc_local((V,), "float32")
            if collapse is not None:
                us = T.alloc_shared((BC, bt), "float32")   # the rounded collapse: [column, token]
                usq = T.alloc_local((TT,), "float32")
                uacc = T.alloc_local((V,), "float32")
                uv = T.alloc_local((V,), dt)
                for e in T.unroll(TT):
                    usq[e] = 0.0
            rg = tx % RG
            tg = tx // RG
            for e in T.unroll(TT * TM):
                acc[e] = 0.0
            for e in T.unroll(TT):
                sq[e] = 0.0
            for ch in T.serial(NCH):
                c0 = bs * CS + ch * BC
                # per (token, vector) item: the residual read once; s_i (the new residual out_i, or x_i)
                # staged rounded; the collapse u of the stored s_i written once and staged
                for it in T.serial(XL):
                    idx = it * threads + tx
                    if idx < bt * NVC:
                        t = idx % bt
                        cv = idx // bt
                        tok = bx * bt + t
                        col = c0 + cv * V
                        if tok < Tn and col < C:
                            if with_post:
                                for v in T.vectorized(V):
                                    yv[v] = y[tok, col + v]
                            for j in T.unroll(n):
                                for v in T.vectorized(V):
                                    xv[j, v] = residual[tok, j, col + v]
                            if collapse == "mix":
                                for v in T.vectorized(V):
                                    uacc[v] = 0.0
                            if with_post:
                                # out_i = post_i y + sum_j comb[j, i] x_j, rounded once and written
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
                                    if collapse == "mix":
                                        for v in T.vectorized(V):
                                            uacc[v] += prev_pre[tok, i] * T.cast(ov[v], "float32")
                                    if collapse == "first":
                                        if i == 0:
                                            for v in T.vectorized(V):
                                                uv[v] = ov[v]
                            else:
                                for i in T.unroll(n):
                                    for v in T.unroll(V):
                                        xs[i * BC + cv * V + v, t] = T.cast(xv[i, v], "float32")
                                    if collapse == "mix":
                                        for v in T.vectorized(V):
                                            uacc[v] += prev_pre[tok, i] * T.cast(xv[i, v], "float32")
                                if collapse == "first":
                                    for v in T.vectorized(V):
                                        uv[v] = xv[0, v]
                            if collapse is not None:
                                # u = sum_i prev_pre_i s_i (or s_0), one rounding; written once, staged
                                if collapse == "mix":
                                    for v in T.vectorized(V):
                                        uv[v] = T.cast(uacc[v], dt)
                                for v in T.vectorized(V):
                                    layer_input[tok, col + v] = uv[v]
                                for v in T.unroll(V):
                                    us[cv * V + v, t] = T.cast(uv[v], "float32")
                        else:
                            for i in T.unroll(n):
                                for v in T.unroll(V):
                                    xs[i * BC + cv * V + v, t] = 0.0
                            if collapse is not None:
                                for v in T.unroll(V):
                                    us[cv * V + v, t] = 0.0
                # fn's rows for the same columns of every stream (zero past C and in the padded rows); with the
                # fold, fn * norm_weight
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
                            if fold:
                                for v in T.vectorized(VF):
                                    wv[v] = norm_weight[i * C + c0 + cc + v]
                                for v in T.unroll(VF):
                                    fs[i * BC + cc + v, j] = fv[v] * wv[v]
                            else:
                                for v in T.unroll(VF):
                                    fs[i * BC + cc + v, j] = fv[v]
                        else:
                            for v in T.unroll(VF):
                                fs[i * BC + cc + v, j] = 0.0
                T.sync_threads()
                # acc[t, j] += sum_k s[t, k] * fn[j, k];  sq[t] += sum_k s[t, k]^2   (this chunk's k)
                accumulate(xs, fs, KR, xr, fr, acc, sq, tg, rg)
                if collapse is not None:
                    # usq[t] += sum_c u[t, c]^2 over this chunk's columns, in column order
                    for kk in T.serial(BC):
                        for a in T.unroll(TT):
                            usq[a] += us[kk, tg * TT + a] * us[kk, tg * TT + a]
                T.sync_threads()
            store_partials(part_mix, part_sq, acc, sq, bx * bt, bs, tg, rg)
            if collapse is not None:
                for a in T.unroll(TT):
                    if rg == 0 and bx * bt + tg * TT + a < Tn:
                        part_usq[bs, bx * bt + tg * TT + a] = usq[a]

    if with_post and collapse is None:
        @T.prim_func
        def post_project(y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),              # inputs
                         post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                         fn: T.Tensor((m, K), "float32"), norm_weight: T.Tensor((K,), "float32"),
                         out: T.Tensor((Tn, n, C), dt),                                               # outputs
                         part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32")):
            main_loop(y, residual, post, comb, None, fn, norm_weight, out, None, part_mix, part_sq, None)

        return post_project
    if collapse is None:
        raise ValueError("the projection alone is norm.py's kernel: give with_post or a collapse")
    if not with_post and collapse == "first":
        @T.prim_func
        def pre_sp_project_first(residual: T.Tensor((Tn, n, C), dt), fn: T.Tensor((m, K), "float32"),   # in
                                 norm_weight: T.Tensor((K,), "float32"),
                                 layer_input: T.Tensor((Tn, C), dt),                                    # outputs
                                 part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                                 part_usq: T.Tensor((S, Tn), "float32")):
            main_loop(None, residual, None, None, None, fn, norm_weight, None, layer_input, part_mix, part_sq,
                      part_usq)

        return pre_sp_project_first
    if not with_post:
        @T.prim_func
        def pre_sp_project(residual: T.Tensor((Tn, n, C), dt), prev_pre: T.Tensor((Tn, n), "float32"),  # inputs
                           fn: T.Tensor((m, K), "float32"), norm_weight: T.Tensor((K,), "float32"),
                           layer_input: T.Tensor((Tn, C), dt),                                          # outputs
                           part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                           part_usq: T.Tensor((S, Tn), "float32")):
            main_loop(None, residual, None, None, prev_pre, fn, norm_weight, None, layer_input, part_mix, part_sq,
                      part_usq)

        return pre_sp_project
    if collapse == "first":
        @T.prim_func
        def post_pre_sp_project_first(y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),      # inputs
                                      post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                                      fn: T.Tensor((m, K), "float32"), norm_weight: T.Tensor((K,), "float32"),
                                      out: T.Tensor((Tn, n, C), dt), layer_input: T.Tensor((Tn, C), dt),  # outputs
                                      part_mix: T.Tensor((S, Tn, m), "float32"),
                                      part_sq: T.Tensor((S, Tn), "float32"), part_usq: T.Tensor((S, Tn), "float32")):
            main_loop(y, residual, post, comb, None, fn, norm_weight, out, layer_input, part_mix, part_sq, part_usq)

        return post_pre_sp_project_first

    @T.prim_func
    def post_pre_sp_project(y: T.Tensor((Tn, C), dt), residual: T.Tensor((Tn, n, C), dt),                # inputs
                            post: T.Tensor((Tn, n), "float32"), comb: T.Tensor((Tn, n, n), "float32"),
                            prev_pre: T.Tensor((Tn, n), "float32"), fn: T.Tensor((m, K), "float32"),
                            norm_weight: T.Tensor((K,), "float32"),
                            out: T.Tensor((Tn, n, C), dt), layer_input: T.Tensor((Tn, C), dt),            # outputs
                            part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                            part_usq: T.Tensor((S, Tn), "float32")):
        main_loop(y, residual, post, comb, prev_pre, fn, norm_weight, out, layer_input, part_mix, part_sq, part_usq)

    return post_pre_sp_project


def _iters(s: Shape) -> dict:
    return {"iters": 20}


kernel_def(KernelDef("mhc_pre_tail", "mhc_pre", _build_pre_tail, TAIL_KEYS, _iters,
                     aot_config=lambda s: tail_kernel_config(default_config("mhc_pre", s))))
kernel_def(KernelDef("mhc_pre_norm_tail", "mhc_pre", _build_pre_norm_tail, NORM_TAIL_KEYS, _iters,
                     aot_config=lambda s: norm_tail_kernel_config(default_config("mhc_pre", s))))
PROJECT_KEYS = ("block_T", "block_K", "thread_T", "thread_M", "split_K", "mma")


def _build_post_project(n, C, dtype, cfg, rows=None, fold=False):
    return _build_project(n, C, dtype, cfg, rows, with_post=True, fold=fold)


def _build_pre_sp_project(n, C, dtype, cfg, collapse="mix", fold=False):
    return _build_project(n, C, dtype, cfg, with_post=False, collapse=collapse, fold=fold)


def _build_post_pre_sp_project(n, C, dtype, cfg, collapse="mix", fold=False):
    return _build_project(n, C, dtype, cfg, with_post=True, collapse=collapse, fold=fold)


def _mix_collapse(s: Shape) -> dict:
    return {"collapse": "mix"}


kernel_def(KernelDef("post_project", "norm_fn", _build_post_project, PROJECT_KEYS))
kernel_def(KernelDef("pre_sp_project", "norm_fn", _build_pre_sp_project, PROJECT_KEYS, _mix_collapse))
kernel_def(KernelDef("post_pre_sp_project", "norm_fn", _build_post_pre_sp_project, PROJECT_KEYS, _mix_collapse))
kernel_def(KernelDef("mhc_pre_sp_tail", "mhc_pre_sp", _build_pre_sp_tail, TAIL_KEYS,
                     lambda s: {"iters": 20, "normalize": True},
                     aot_config=lambda s: tail_kernel_config(default_config("mhc_pre_sp", s))))


# -- launch wrappers: the backend's overrides of the mhc_pre and post_pre composites ----------------------
def fp8_outputs(Tt: int, C: int, fp8_group: int, device) -> tuple:
    """-> (fp8_codes (T, C) uint8 (the float8_e4m3fn bytes), fp8_scales (T, C / fp8_group): float32, or E8M0 bytes
    for group 32): the FP8 copy's buffers, which the tail writes (``torch.empty``: no launch), or the ``(T, 0)``
    placeholders without a group (``fp8_group == 0``). Raises ValueError for a group other than 0, 32, 128 or one
    not dividing ``C``."""
    fp8_group = int(fp8_group)
    _check_fp8("FP8 copy of the layer input", C, fp8_group)
    Q, G = (C, C // fp8_group) if fp8_group else (0, 0)
    return (torch.empty((Tt, Q), dtype=torch.uint8, device=device),
            torch.empty((Tt, G), dtype=fp8_scale_dtype(fp8_group), device=device))


def _fp8_args(fp8_group, fp8_out) -> tuple[dict, tuple]:
    """(the tail's extra build-time constants, its extra kernel arguments) for the FP8 copy: none without a group
    (the kernel and its cache key are the plain tail's), else ``fp8_group`` and (codes as uint8, scales)."""
    if not fp8_group:
        return {}, ()
    codes, scales = fp8_out
    return {"fp8_group": int(fp8_group)}, (codes, scales)


def mhc_pre_tail(part_mix, part_sq, scale, base, residual, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, *,
                 config, fp8_group=0, fp8_out=None):
    """-> (layer_input, post, comb, mixes, rstd, out_rstd) from the projection's split partials, without the
    sublayer's norm (``out_rstd`` is 1, written by the kernel). With ``fp8_group`` the kernel also writes the FP8
    copy of the layer input into ``fp8_out`` (:func:`fp8_outputs`).

    ``config``: the tail kernel's flat config (:func:`tail_kernel_config`); its split count must be the
    partials' own.
    """
    return _launch_tail("mhc_pre_tail", part_mix, part_sq, scale, base, residual, (), config, float(norm_eps),
                        float(pre_eps), float(post_mult), float(sinkhorn_eps), iters=iters, fp8_group=fp8_group,
                        fp8_out=fp8_out)


def _launch_tail(kernel, part_mix, part_sq, scale, base, residual, weight, config, *consts, iters, fp8_group=0,
                 fp8_out=None):
    """Allocate the tail's outputs and launch ``kernel`` (``mhc_pre_tail`` / ``mhc_pre_norm_tail``; ``weight``: the
    inputs it takes after the residual; with ``fp8_group`` its FP8 variant, writing ``fp8_out`` too) ->
    (layer_input, post, comb, mixes, rstd, out_rstd)."""
    from .common import get_kernel

    Tt, n, C = residual.shape
    S, _, m = part_mix.shape
    if config["split_K"] != S:
        raise ValueError(f"{kernel}: config split_K={config['split_K']} but the partials have {S} splits")
    outs = (residual.new_empty((Tt, C)), part_mix.new_empty((Tt, n)), part_mix.new_empty((Tt, n, n)),
            part_mix.new_empty((Tt, m)), part_mix.new_empty((Tt,)), part_mix.new_empty((Tt,)))
    fc, fp8 = _fp8_args(fp8_group, fp8_out)
    if Tt:
        get_kernel(kernel, n, C, residual.dtype, config, residual.device, iters=int(iters), **fc)(
            part_mix, part_sq, scale, base, residual, *weight, *outs, *fp8, *consts)
    return outs


def mhc_pre_norm_tail(part_mix, part_sq, scale, base, residual, out_norm_weight, norm_eps, pre_eps, post_mult, iters,
                      sinkhorn_eps, out_norm_eps, *, config, fp8_group=0, fp8_out=None):
    """-> (layer_input, post, comb, mixes, rstd, out_rstd) from the projection's split partials, the layer input
    normalised with the sublayer's RMSNorm (``out_norm_weight``, float32), in one kernel
    (:func:`_build_pre_norm_tail`; with ``fp8_group`` also the FP8 copy into ``fp8_out``). ``config``: its flat
    config (:func:`norm_tail_kernel_config`)."""
    return _launch_tail("mhc_pre_norm_tail", part_mix, part_sq, scale, base, residual,
                        (out_norm_weight.contiguous(),), config, float(norm_eps), float(pre_eps), float(post_mult),
                        float(sinkhorn_eps), float(out_norm_eps), iters=iters, fp8_group=fp8_group, fp8_out=fp8_out)


def _tail(part_mix, part_sq, scale, base, residual, out_norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps,
          out_norm_eps, fp8_group, config):
    """mhc_pre's second (last) launch for the op config ``config``: the tail, or with the sublayer's norm the tail
    that also normalises; either writes the FP8 copy with ``fp8_group``. -> (layer_input, post, comb, mixes, rstd,
    out_rstd, fp8_codes, fp8_scales)."""
    fp8_out = fp8_outputs(residual.shape[0], residual.shape[-1], fp8_group, residual.device)
    if out_norm_weight is None:
        outs = mhc_pre_tail(part_mix, part_sq, scale, base, residual, norm_eps, pre_eps, post_mult, iters,
                            sinkhorn_eps, config=tail_kernel_config(config), fp8_group=fp8_group, fp8_out=fp8_out)
    else:
        outs = mhc_pre_norm_tail(part_mix, part_sq, scale, base, residual, out_norm_weight, norm_eps, pre_eps,
                                 post_mult, iters, sinkhorn_eps, out_norm_eps, config=norm_tail_kernel_config(config),
                                 fp8_group=fp8_group, fp8_out=fp8_out)
    return outs + fp8_out


def mhc_pre_fwd(residual, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult, iters,
                sinkhorn_eps, out_norm_eps, fp8_group=0, *, config):
    """mhc_pre in two launches -> (layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales):
    the projection's split partials (``norm_weight`` folded into ``fn`` as it is staged), then the fused tail
    (reduce, split, Sinkhorn beside the collapse; ``out_rstd`` 1) or, with the sublayer's norm
    (``out_norm_weight``), the tail whose CTAs own whole rows and normalise the collapse too
    (:func:`_build_pre_norm_tail`). With ``fp8_group`` (128 or 32, dividing C) the tail also writes the FP8 copy of
    the layer input (``quantize_fp8``'s codes (T, C), as uint8 bytes, and scales (T, C / fp8_group) float32, bit for
    bit); with 0 those are ``(T, 0)`` placeholders and the kernels are the plain ones."""
    part_mix, part_sq = norm.norm_fn_partials(residual, fn, norm_weight, config=config["projection"])
    return _tail(part_mix, part_sq, scale, base, residual, out_norm_weight, norm_eps, pre_eps, post_mult, iters,
                 sinkhorn_eps, out_norm_eps, fp8_group, config)


def post_project(layer_output, residual, post_mix, comb_mix, fn, norm_weight, *, config):
    """-> (new_residual, part_mix (S, T, m), part_sq (S, T)): post fused into the projection's main loop
    (``config``: the projection's, "fma" only; ``norm_weight`` folded in the kernel)."""
    from .common import get_kernel

    Tt, n, C = residual.shape
    m = fn.shape[0]
    S = config["split_K"]
    out = torch.empty_like(residual)
    pm = fn.new_empty((S, Tt, m))
    ps = fn.new_empty((S, Tt))
    if Tt == 0:
        return out, pm, ps
    f, nw, fc = norm.fold_args(fn, norm_weight, "fma")
    get_kernel("post_project", n, C, residual.dtype, config, residual.device, **fc)(
        layer_output, residual, post_mix, comb_mix, f, nw, out, pm, ps)
    return out, pm, ps


def post_pre_fwd(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                 pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *, config):
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes, fp8_scales) of the next
    sublayer.

    Two launches with the default ("fma") projection, with or without the sublayer's norm: post fused into the
    projection's main loop (the new residual written once and projected from registers), then mhc_pre's tail
    (the collapse reads the new residual back once; with ``out_norm_weight`` the normalising tail), which also
    writes the FP8 copy of the layer input with ``fp8_group`` (as :func:`mhc_pre_fwd`). A tensor-core projection
    runs post (``config["post"]``), then mhc_pre."""
    if config["projection"]["mma"] != "fma":
        new_residual = streaming.post_fwd(layer_output, residual, post_mix, comb_mix, config=config["post"])
        return (new_residual,) + mhc_pre_fwd(new_residual, fn, scale, base, norm_weight, out_norm_weight, norm_eps,
                                             pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group,
                                             config=config)
    new_residual, part_mix, part_sq = post_project(layer_output, residual, post_mix, comb_mix, fn, norm_weight,
                                                   config=config["projection"])
    return (new_residual,) + _tail(part_mix, part_sq, scale, base, new_residual, out_norm_weight, norm_eps, pre_eps,
                                   post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group, config)


# -- single-pass (contract §14): mhc_pre_sp and post_pre_sp, the residual read once ------------------------
def sp_project(residual, prev_pre, fn, norm_weight, *, config, post=None):
    """-> (new_residual or None, layer_input (T, C) = the rounded collapse u, part_mix (S, T, m), part_sq (S, T),
    part_usq (S, T)): the projection with the collapse (with ``prev_pre``, or stream 0 when it is None) in its
    main loop; ``post = (layer_output, post_mix, comb_mix)`` also fuses post in front (the collapse and the
    projection then see the rounded new residual). ``config``: the projection's, "fma" only; ``norm_weight`` is
    folded in the kernel."""
    from .common import get_kernel

    Tt, n, C = residual.shape
    m = fn.shape[0]
    S = config["split_K"]
    layer_input = residual.new_empty((Tt, C))
    new_residual = None if post is None else torch.empty_like(residual)
    pm, ps, pu = fn.new_empty((S, Tt, m)), fn.new_empty((S, Tt)), fn.new_empty((S, Tt))
    if Tt == 0:
        return new_residual, layer_input, pm, ps, pu
    collapse = "first" if prev_pre is None else "mix"
    w = () if prev_pre is None else (prev_pre.contiguous(),)
    f, nw, fc = norm.fold_args(fn, norm_weight, "fma")
    if post is None:
        get_kernel("pre_sp_project", n, C, residual.dtype, config, residual.device, collapse=collapse, **fc)(
            residual, *w, f, nw, layer_input, pm, ps, pu)
    else:
        y, post_mix, comb_mix = post
        get_kernel("post_pre_sp_project", n, C, residual.dtype, config, residual.device, collapse=collapse, **fc)(
            y, residual, post_mix, comb_mix, *w, f, nw, new_residual, layer_input, pm, ps, pu)
    return new_residual, layer_input, pm, ps, pu


def mhc_pre_sp_tail(part_mix, part_sq, part_usq, scale, base, out_norm_weight, layer_input, norm_eps, pre_eps,
                    post_mult, iters, sinkhorn_eps, out_norm_eps, *, config, fp8_group=0, fp8_out=None):
    """-> (layer_input, pre, post, comb, mixes, rstd, out_rstd) from the partials of :func:`sp_project`;
    ``layer_input`` (the rounded collapse) is normalised in place when ``out_norm_weight`` is given. With
    ``fp8_group`` the kernel also writes the FP8 copy of the final layer input into ``fp8_out``
    (:func:`fp8_outputs`)."""
    from .common import get_kernel

    S, Tt, m = part_mix.shape
    C = layer_input.shape[-1]
    n = stream_count(m)
    if config["split_K"] != S:
        raise ValueError(f"mhc_pre_sp tail: config split_K={config['split_K']} but the partials have {S} splits")
    pre, post = part_mix.new_empty((Tt, n)), part_mix.new_empty((Tt, n))
    comb, mixes = part_mix.new_empty((Tt, n, n)), part_mix.new_empty((Tt, m))
    rstd, out_rstd = part_mix.new_empty((Tt,)), part_mix.new_empty((Tt,))
    if Tt == 0:
        return layer_input, pre, post, comb, mixes, rstd, out_rstd
    normalize = out_norm_weight is not None
    # float32 (the op's rule: no cast); without one a placeholder the kernel never reads (torch.empty launches
    # nothing, ones would be a fill)
    w = out_norm_weight.contiguous() if normalize else part_mix.new_empty((C,))
    fc, fp8 = _fp8_args(fp8_group, fp8_out)
    get_kernel("mhc_pre_sp_tail", n, C, layer_input.dtype, config, layer_input.device, iters=int(iters),
               normalize=normalize, **fc)(
        part_mix, part_sq, part_usq, scale, base, w, layer_input, pre, post, comb, mixes, rstd, out_rstd, *fp8,
        float(norm_eps), float(pre_eps), float(post_mult), float(sinkhorn_eps), float(out_norm_eps))
    return layer_input, pre, post, comb, mixes, rstd, out_rstd


def mhc_pre_sp_fwd(residual, prev_pre, fn, scale, base, norm_weight, out_norm_weight, norm_eps, pre_eps, post_mult,
                   iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *, config):
    """mhc_pre_sp in two launches -> (layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd, fp8_codes,
    fp8_scales): the projection with the collapse in its main loop (the residual's only read), then the tail
    (reduce, split, Sinkhorn; the out-norm beside it; with ``fp8_group`` the FP8 copy of the layer input, as
    :func:`mhc_pre_fwd`)."""
    fp8_out = fp8_outputs(residual.shape[0], residual.shape[-1], fp8_group, residual.device)
    _, u, pm, ps, pu = sp_project(residual, prev_pre, fn, norm_weight, config=config["projection"])
    return mhc_pre_sp_tail(pm, ps, pu, scale, base, out_norm_weight, u, norm_eps, pre_eps, post_mult, iters,
                           sinkhorn_eps, out_norm_eps, config=tail_kernel_config(config), fp8_group=fp8_group,
                           fp8_out=fp8_out) + fp8_out


def post_pre_sp_fwd(layer_output, residual, post_mix, comb_mix, prev_pre, fn, scale, base, norm_weight,
                    out_norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, out_norm_eps, fp8_group=0, *,
                    config):
    """post_pre_sp in two launches -> (new_residual, layer_input, pre, post_mix, comb_mix, mixes, rstd, out_rstd,
    fp8_codes, fp8_scales): post, the collapse and the projection in one main loop (residual and layer output read
    once, new residual and layer input written once), then the tail (with ``fp8_group`` also the FP8 copy of the
    layer input)."""
    fp8_out = fp8_outputs(residual.shape[0], residual.shape[-1], fp8_group, residual.device)
    new_residual, u, pm, ps, pu = sp_project(residual, prev_pre, fn, norm_weight, config=config["projection"],
                                             post=(layer_output, post_mix, comb_mix))
    return (new_residual,) + mhc_pre_sp_tail(pm, ps, pu, scale, base, out_norm_weight, u, norm_eps, pre_eps,
                                             post_mult, iters, sinkhorn_eps, out_norm_eps,
                                             config=tail_kernel_config(config), fp8_group=fp8_group,
                                             fp8_out=fp8_out) + fp8_out
