"""``norm_fn`` forward and backward: the reordered-RMSNorm projection.

Forward: ``mixes = (x_flat @ fn_eff^T) * rsqrt(sum(x_flat^2) / K + eps)`` with
``fn_eff = fn * norm_weight`` (folded by the "fma" kernels as they stage ``fn``, by a torch multiply in front
of the tensor-core ones: :func:`fold_args`). The projection
is a ``(T, K) x (K, m)`` product with ``m = n(n+2)``; config key ``mma`` picks how:

* ``"fma"`` (the default): plain float32 FMAs, no tensor cores. ``fn`` is **not rounded**
  (no TF32), ``x`` is converted to float32 exactly, products and sums are float32 -- so
  the result matches the float32 contract to accumulation error.
* ``"3xtf32"``: TF32 tensor cores (mma.sync m16n8k8) with the rounding error split off:
  ``fn = hi + lo`` with ``hi`` = fn rounded to TF32 and ``lo`` = the remainder rounded to
  TF32 (likewise ``x = hi + lo`` for a float32 residual; bf16/fp16 values are exact in
  TF32), and ``x.fn = x.hi + x.lo`` (float32 x: all four hi/lo products) summed in
  float32. What is dropped is ~2^-22 relative, so this also meets the float32 contract
  (float64 emulation of the roundings on the test inputs: 0.2-0.4% of the float32
  tolerance). Two (four) times the MMAs of plain TF32 -- the projection is memory-bound,
  so that costs little.
* ``"tf32"``: one TF32 product (``fn``, and a float32 ``x``, rounded to TF32). Relative
  error ~2^-11 per product: the float64 emulation lands 7-14x *outside* the float32
  tolerance (truncating instead of rounding: 10-23x), so it is for explicit configs with
  a looser tolerance only and is not in :func:`config_space` (the tuner would reject it).

TF32 rounding is done in the kernel, to nearest with ties away from zero (the bit
pattern's ``+ 0x1000`` then ``& ~0x1fff``, which is ``cvt.rna.tf32.f32``), on ``fn_eff`` as
it is staged (per chunk, in registers) and on a float32 ``x``: the MMA's operands have
their low 13 bits clear, so whatever the hardware does with those bits (it drops them:
truncation, which DeepSeek's kernels pre-round against too) never matters, and no
extra pass over ``fn`` or ``x`` is needed.

Tiling, ``mma = "fma"``: a CTA owns ``block_T`` tokens and one K-range (``split_K``
ranges when the token count is small, so enough CTAs stream ``x``); it stages ``block_K``
columns of ``x`` and of ``fn`` (rows padded up to a multiple of the per-thread row
tile, padded rows are zero) in shared memory, transposed so a warp reads
consecutive words, and each thread accumulates a ``thread_T x thread_M`` register
tile of dot products (``thread_T + thread_M`` shared loads per ``thread_T * thread_M``
FMAs). The sum of squares is accumulated in the same main loop from the same staged
tile of ``x``. With ``split_K > 1`` the CTAs write per-split partial dots and sums of
squares and a second kernel adds them in split order (deterministic) and applies rstd.

Tiling, tensor cores (:func:`_build_fwd_mma`; same grid, split-K partials and finalize
kernel): per ``block_K`` chunk each thread holds a fixed token's slice of ``x`` in
registers (the next chunk's loads are issued before this chunk's MMAs), adds its
squares to a float32 sum of squares and stores it as float32 into the shared A tile;
``fn``'s chunk goes to the B tile (rows zero-padded to a multiple of 16 for the MMA's N;
``[hi; lo]`` stacked for 3xtf32); one ``T.gemm`` per chunk accumulates in float32
registers. Memory traffic: ``x`` is read once from global memory; ``fn`` (``m x K``
float32) once per token block (from L2), i.e. ``2m / block_T`` bytes per byte of bf16 ``x``.
Per element of ``x`` the shared memory sees a 4-byte store and ldmatrix reads of the A
tile once per warp column plus the B tile once per warp row (~20-30 bytes per 2-byte x
element for 3xtf32 at n = 4), so the kernel may well be bound by shared-memory bandwidth
rather than HBM, and at n = 8 also by fn's L2 traffic; whether it beats the FMA kernel
(whose FMA count grows with m) is a question for the GPU.

Why ``"fma"`` stays the default: the tensor-core kernels compile cleanly (sm_80,
sm_90a, sm_100a; see tests/test_tilelang_compile.py) but have not yet been run on a GPU.
The tuner checks every candidate config against the reference before timing it, so a
``3xtf32`` config can only be tuned in where it is correct (and faster); the GPU test
(tests/test_tilelang_gpu.py) checks both tensor-core modes against the oracle.

Backward (contract §9), with ``g = d mixes`` and ``r = rstd``:
``d_x = r * (g @ fn_eff) - (r^2 / K) * (g . mixes) * x`` -- one thread per column of
``x`` keeps that column of ``fn_eff`` in registers and loops over a staged block of
tokens; ``d_fn_eff = (g * r)^T @ x`` -- one thread per column accumulates its ``m``
sums over a token range, each CTA writing a per-token-range partial that the wrapper
sums in order (deterministic, no atomics).

Config keys: ``mma`` ("fma" | "3xtf32" | "tf32"), ``block_T``, ``block_K``, ``split_K``
(forward, all modes); ``thread_T``, ``thread_M`` (forward, "fma" only: ignored by the
tensor-core kernels but part of every config); ``dx_block_T``, ``block_K``,
``dfn_block_T``, ``split_T`` (backward). Tensor-core candidates in
:func:`config_space` also carry ``smem_bytes`` (an upper-bound estimate, which the
tuner's pruning compares with the device's limit). Tensor-core tiles: ``block_T`` 32 or
64, ``block_K`` a multiple of 64 (64, 128, 256 are the ones compiled and offered).
"""

import torch

from mhc_kernels.specs import prev_pow2

from .common import KernelDef, Shape, cdiv, dtype_name, get_kernel, kernel_def, max_vec, num_sms

FUSED_KEYS = ("block_T", "block_K", "thread_T", "thread_M", "mma")
FWD_KEYS = FUSED_KEYS + ("split_K",)
FIN_KEYS = ("split_K",)
DX_KEYS = ("dx_block_T", "block_K")
DFN_KEYS = ("dfn_block_T", "block_K", "split_T")


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


def default_config(op: str, s: Shape) -> dict:
    """``norm_fn``: the forward tiling (``block_T`` tokens x ``block_K`` columns per step, the
    ``thread_T x thread_M`` register tile, ``split_K`` K ranges when the token blocks alone cannot fill
    the GPU, ``mma``); ``norm_fn_bwd``: the d_x kernel's ``dx_block_T`` tokens per staged block, the
    ``block_K`` columns per CTA of both kernels, the d_fn kernel's ``dfn_block_T`` and its ``split_T``
    token ranges."""
    m = mix_rows(s.n)
    K = s.n * s.C
    if op == "norm_fn_bwd":
        # d_fn: enough token ranges that K/block_K * split_T CTAs fill the GPU
        kblocks = cdiv(K, 128)
        split_T = prev_pow2(max(1, min(cdiv(2 * num_sms(), kblocks), cdiv(max(s.T, 1), 32), 256)))
        return {"dx_block_T": 32, "block_K": 128, "dfn_block_T": 32, "split_T": split_T}
    rg, tm = _row_tiling(m)
    tt = 4 if m > 4 else 2
    bt = 128 if rg <= 4 else 64
    bt = max(bt, (128 // rg) * tt) if rg * (bt // tt) < 64 else bt
    bk = 32
    # split K when the token blocks alone cannot fill the GPU (2 CTAs per SM)
    tblocks = max(1, cdiv(max(s.T, 1), bt))
    split_K = max(1, min(cdiv(2 * num_sms(), tblocks), cdiv(K, 8 * bk), 64))
    split_K = prev_pow2(split_K)  # few distinct values: each is a compiled kernel, whatever T is
    return {"block_T": bt, "block_K": bk, "thread_T": tt, "thread_M": tm, "split_K": split_K, "mma": "fma"}


def config_space(op: str, s: Shape) -> list[dict]:
    d = default_config(op, s)
    out = [d]
    if op == "norm_fn":
        for bk in (16, 32, 64):
            for sp in sorted({1, 2, 4, 8, d["split_K"]}):
                c = dict(d, block_K=bk, split_K=sp)
                if c not in out:
                    out.append(c)
        # tensor cores: 3xtf32 only -- plain tf32 misses the float32 tolerance (see the module docstring)
        m = mix_rows(s.n)
        for bt in (32, 64):
            for bk in (64, 128, 256):
                smem = mma_smem_bytes(m, s.dtype, bt, bk, "3xtf32")
                if smem > MMA_SMEM_BUDGET or mma_acc_per_thread(m, s.dtype, bt, bk, "3xtf32") > MMA_MAX_ACC:
                    continue
                for sp in sorted({1, 2, 4, 8, d["split_K"]}):
                    c = dict(d, mma="3xtf32", block_T=bt, block_K=bk, split_K=sp, smem_bytes=smem)
                    if c not in out:
                        out.append(c)
    else:
        for bt in (16, 32, 64):
            for bk in (64, 128, 256):
                for ds in sorted({d["split_T"], max(1, d["split_T"] // 2), d["split_T"] * 2}):
                    c = dict(d, dx_block_T=bt, block_K=bk, dfn_block_T=bt, split_T=ds)
                    if c not in out:
                        out.append(c)
    return out


# -- forward -------------------------------------------------------------------------------------
def fma_tile_macros(TT: int, TM: int, m: int, Tn):
    """The FMA projection's register tile, shared by the plain main loop and the fused post + projection
    (``fused.py``): each thread owns ``TT`` tokens x ``TM`` rows of fn (token group ``tg``, row group ``rg``).

    ``accumulate(xs, fs, nk, ...)``: for each of ``nk`` staged rows k of ``xs [k, token]`` and ``fs [k, row]``,
    ``TT + TM`` shared loads feed ``TT * TM`` FMAs into ``acc`` and ``TT`` into the sums of squares ``sq``.
    ``store_partials(...)``: the unnormalised dots and sums of squares of split ``bs``. ``Tn`` (the kernel's
    symbolic token count) is closed over, not passed: a macro parameter would rename it in the source."""
    import tilelang.language as T

    @T.macro
    def accumulate(xs, fs, nk, xr, fr, acc, sq, tg, rg):
        for kk in T.serial(nk):
            for a in T.unroll(TT):
                xr[a] = xs[kk, tg * TT + a]
            for b in T.unroll(TM):
                fr[b] = fs[kk, rg * TM + b]
            for a in T.unroll(TT):
                sq[a] += xr[a] * xr[a]
                for b in T.unroll(TM):
                    acc[a * TM + b] += xr[a] * fr[b]

    @T.macro
    def store_partials(part_mix, part_sq, acc, sq, tok0, bs, tg, rg):
        for a in T.unroll(TT):
            tok = tok0 + tg * TT + a
            if tok < Tn:
                if rg == 0:
                    part_sq[bs, tok] = sq[a]
                for b in T.unroll(TM):
                    if rg * TM + b < m:
                        part_mix[bs, tok, rg * TM + b] = acc[a * TM + b]

    return accumulate, store_partials


def _build_fwd(n, C, dtype, cfg, fused, rows=None, fold=False):
    """Main loop. ``fused``: one K range (split_K == 1), finalise in place; else write partials. ``fold``: fn's
    chunk is multiplied by ``norm_weight`` as it is staged (``fn * norm_weight`` rounded once, as the torch fold
    would make it, without a launch of its own); otherwise ``norm_weight`` is a placeholder the kernel never reads."""
    import tilelang.language as T

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bk, TT, TM = cfg["block_T"], cfg["block_K"], cfg["thread_T"], cfg["thread_M"]
    S = 1 if fused else cfg["split_K"]
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
    accumulate, store_partials = fma_tile_macros(TT, TM, m, Tn)

    @T.prim_func
    # inputs x, fn, norm_weight; outputs mixes, rstd (split_K == 1) or the partials part_mix, part_sq; constant eps
    def norm_fn_fwd(x: T.Tensor((Tn, K), dt), fn: T.Tensor((m, K), "float32"), norm_weight: T.Tensor((K,), "float32"),
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
            if fold:
                wv = T.alloc_local((VF,), "float32")
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
                # stage fn, with the fold fn * norm_weight (padded rows and the K tail are zero)
                for it in T.serial(FL):
                    idx = it * threads + tx
                    if idx < MP * (bk // VF):
                        kv = idx % (bk // VF)
                        j = idx // (bk // VF)
                        q = k0 + kv * VF
                        if j < m and q < K:
                            for v in T.vectorized(VF):
                                fv[v] = fn[j, q + v]
                            if fold:
                                for v in T.vectorized(VF):
                                    wv[v] = norm_weight[q + v]
                                for v in T.unroll(VF):
                                    fs[kv * VF + v, j] = fv[v] * wv[v]
                            else:
                                for v in T.unroll(VF):
                                    fs[kv * VF + v, j] = fv[v]
                        else:
                            for v in T.unroll(VF):
                                fs[kv * VF + v, j] = 0.0
                T.sync_threads()
                # acc[t, j] += sum_k x[t, k] * fn[j, k];  sq[t] += sum_k x[t, k]^2   (this chunk's k)
                accumulate(xs, fs, bk, xr, fr, acc, sq, tg, rg)
                T.sync_threads()
            if fused:
                # rstd = rsqrt(sq / K + eps);  mixes = acc * rstd
                for a in T.unroll(TT):
                    tok = bx * bt + tg * TT + a
                    if tok < Tn:
                        r = T.alloc_var("float32")
                        r = T.rsqrt(sq[a] / K + eps)
                        if rg == 0:
                            rstd[tok] = r
                        for b in T.unroll(TM):
                            if rg * TM + b < m:
                                mixes[tok, rg * TM + b] = acc[a * TM + b] * r
            else:
                store_partials(part_mix, part_sq, acc, sq, bx * bt, bs, tg, rg)

    return norm_fn_fwd


# -- forward on tensor cores (mma = "tf32" / "3xtf32") ----------------------------------------------
MMA_MODES = ("fma", "tf32", "3xtf32")
MMA_SMEM_BUDGET = 99 * 1024  # config_space: tiles that run on sm_86/89 too, 2 CTAs/SM on sm_90/100
MMA_MAX_ACC = 128            # config_space: float32 accumulators per thread (160 spills, at n=8 float32 3xtf32)


def _mma_rows(m: int) -> int:
    """fn's rows zero-padded to a multiple of 16 (the MMA N extent; two warps split N when block_T = 32)."""
    return max(16, cdiv(m, 16) * 16)


def _mma_threads(bt: int, bk: int) -> int:
    """4 warps, 8 when a tile would leave a thread more than 64 elements of x per chunk in registers."""
    return 128 if bt * bk <= 128 * 64 else 256


def _mma_shape(m: int, dtype: torch.dtype, bt: int, mode: str):
    """(A rows, B rows) of the one GEMM per chunk: x (with its lo part below it for float32 x in 3xtf32)
    times fn (with its lo part below it in 3xtf32)."""
    split = mode == "3xtf32"
    return bt * (2 if split and dtype == torch.float32 else 1), _mma_rows(m) * (2 if split else 1)


def mma_smem_bytes(m: int, dtype: torch.dtype, bt: int, bk: int, mode: str) -> int:
    """Shared memory of the tensor-core forward: the float32 A and B tiles (``block_K`` wide); the per-token
    partials and the accumulator copy of the epilogue reuse that space after the main loop."""
    ar, br = _mma_shape(m, dtype, bt, mode)
    return 4 * max(bk * (ar + br), ar * br + 2 * bt) + 4 * _mma_threads(bt, bk)


def mma_acc_per_thread(m: int, dtype: torch.dtype, bt: int, bk: int, mode: str) -> int:
    ar, br = _mma_shape(m, dtype, bt, mode)
    return ar * br // _mma_threads(bt, bk)


def _check_mode(mode):
    if mode not in MMA_MODES:
        raise ValueError(f"norm_fn config: mma must be one of {MMA_MODES}, got {mode!r}")


def _build_fwd_mma(n, C, dtype, cfg, fused, rows=None, fold=False):
    """Tensor-core main loop (``mma`` = "tf32" or "3xtf32"); same tensors and outputs as :func:`_build_fwd`, but
    ``fn`` comes folded (the wrapper's torch fold: in the kernel the product would be contracted into the split's
    ``fn - hi`` and round differently) and ``norm_weight`` is not read.

    A CTA owns ``block_T`` tokens x one K range. Per ``block_K`` chunk each thread holds a fixed token and
    ``block_T * block_K / threads`` consecutive-vector elements of its row in registers (loaded one chunk
    ahead: chunk i+1's global loads are in flight during chunk i's MMAs), adds their squares to its float32
    sum of squares, and stores them as float32 (16-byte stores) into the A tile; fn's chunk (m rows, zero past
    K) goes to the B tile, whose rows m.._mma_rows(m)-1 are zero. One ``T.gemm(A, B, acc, transpose_B=True)``
    per chunk: mma.sync m16n8k8 TF32 from swizzled shared tiles (ldmatrix), float32 accumulators held in
    registers over the whole K range. "3xtf32" stacks fn's hi and lo parts as B = [hi; lo] (and, for a
    float32 x, A = [hi; lo]), so the one GEMM yields every hi/lo product; the epilogue adds them per token.
    Operands are rounded to TF32 in the kernel, to nearest with ties away from zero
    (``(bits + 0x1000) & ~0x1fff``, the rounding of ``cvt.rna.tf32.f32``), so the MMA's inputs do not depend
    on how the hardware drops low mantissa bits.
    """
    import tilelang.language as T

    dt = dtype_name(dtype)
    m = rows or mix_rows(n)
    K = n * C
    bt, bk, mode = cfg["block_T"], cfg["block_K"], cfg["mma"]
    _check_mode(mode)
    assert mode != "fma"
    if fold:
        raise ValueError("the tensor-core projection takes fn folded (fold=False)")
    S = 1 if fused else cfg["split_K"]
    split = mode == "3xtf32"                  # fn = hi + lo
    x_split = split and dtype == torch.float32  # x = hi + lo as well (bf16 / fp16 are exact in TF32)
    x_round = dtype == torch.float32
    MP = _mma_rows(m)
    AR, BR = _mma_shape(m, dtype, bt, mode)
    threads = _mma_threads(bt, bk)
    assert bk % 64 == 0 and bt % 16 == 0 and threads % bt == 0, (bt, bk)
    TPT = threads // bt                       # threads per token
    V = max_vec(dtype, C)                     # x vector: divides C (hence K); whole vectors per thread
    while bk % (V * TPT):
        V //= 2
    XL = bk // (V * TPT)                      # x vectors per thread per chunk
    VF = 4 if K % 4 == 0 else (2 if K % 2 == 0 else 1)
    FR = bk // VF                             # fn vectors per row per chunk
    FL = cdiv(m * FR, threads)
    PL = cdiv((MP - m) * bk, threads)         # zero pad rows of B (per part)
    OL = cdiv(bt * m, threads)                # outputs per thread
    KS = cdiv(cdiv(K, S), bk) * bk            # K per split, whole chunks
    NCH = KS // bk
    Tn = T.dynamic("T")

    def rna(v):  # float32 -> nearest TF32 (ties away from zero), as a float32 with the low 13 bits clear
        return T.reinterpret(T.bitwise_and(T.reinterpret(v, "uint32") + T.uint32(0x1000), T.uint32(0xFFFFE000)),
                             "float32")

    @T.prim_func
    # inputs x, fn (folded), norm_weight (not read); outputs mixes, rstd (split_K == 1) or the partials part_mix,
    # part_sq; constant eps
    def norm_fn_fwd_mma(x: T.Tensor((Tn, K), dt), fn: T.Tensor((m, K), "float32"),
                        norm_weight: T.Tensor((K,), "float32"),
                        mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),
                        part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),
                        eps: T.float32):
        with T.Kernel(T.ceildiv(Tn, bt), S, threads=threads) as (bx, bs):
            tx = T.get_thread_binding(0)
            xs = T.alloc_shared((AR, bk), "float32")   # A: x as [token, k] (rows bt.. : lo part)
            fs = T.alloc_shared((BR, bk), "float32")   # B: fn as [row, k] (rows MP.. : lo part)
            sqp = T.alloc_shared((threads,), "float32")
            rs = T.alloc_shared((bt,), "float32")
            cs = T.alloc_shared((AR, BR), "float32")   # the accumulators, for the epilogue
            acc = T.alloc_fragment((AR, BR), "float32")
            xv = T.alloc_local((XL * V,), dt)
            fv = T.alloc_local((VF,), "float32")
            fr = T.alloc_local((VF,), "float32")
            xr = T.alloc_local((V,), "float32")
            sq = T.alloc_var("float32")
            f = T.alloc_var("float32")
            s = T.alloc_var("float32")
            t = tx // TPT
            g = tx % TPT
            tok = bx * bt + t
            kbeg = bs * KS
            T.clear(acc)
            sq = 0.0
            # fn's pad rows are zero for the whole loop: written once
            for it in T.serial(PL):
                if it * threads + tx < (MP - m) * bk:
                    fs[m + (it * threads + tx) // bk, (it * threads + tx) % bk] = 0.0
                    if split:
                        fs[MP + m + (it * threads + tx) // bk, (it * threads + tx) % bk] = 0.0
            # chunk 0 of this thread's token row into registers (zero outside the tokens / K range)
            for it in T.unroll(XL):
                if tok < Tn and kbeg + (it * TPT + g) * V < K:
                    for v in T.vectorized(V):
                        xv[it * V + v] = x[tok, kbeg + (it * TPT + g) * V + v]
                else:
                    for v in T.unroll(V):
                        xv[it * V + v] = T.cast(0, dt)
            for ch in T.serial(NCH):
                k0 = kbeg + ch * bk
                # x: sum of squares, then the float32 (TF32-rounded for float32 x) values into A
                for e in T.unroll(XL * V):
                    f = T.cast(xv[e], "float32")
                    sq += f * f
                for it in T.unroll(XL):
                    if x_round:
                        for v in T.unroll(V):
                            xr[v] = rna(T.cast(xv[it * V + v], "float32"))
                        for v in T.vectorized(V):
                            xs[t, (it * TPT + g) * V + v] = xr[v]
                        if x_split:
                            for v in T.unroll(V):
                                xr[v] = rna(T.cast(xv[it * V + v], "float32") - xr[v])
                            for v in T.vectorized(V):
                                xs[bt + t, (it * TPT + g) * V + v] = xr[v]
                    else:
                        for v in T.vectorized(V):
                            xs[t, (it * TPT + g) * V + v] = T.cast(xv[it * V + v], "float32")
                # fn: rows < m (zero past K) rounded to TF32 into B, their rounding errors (rounded) below
                for it in T.unroll(FL):
                    if it * threads + tx < m * FR:
                        if k0 + ((it * threads + tx) % FR) * VF < K:
                            for v in T.vectorized(VF):
                                fv[v] = fn[(it * threads + tx) // FR, k0 + ((it * threads + tx) % FR) * VF + v]
                        else:
                            for v in T.unroll(VF):
                                fv[v] = 0.0
                        for v in T.unroll(VF):
                            fr[v] = rna(fv[v])
                        for v in T.vectorized(VF):
                            fs[(it * threads + tx) // FR, ((it * threads + tx) % FR) * VF + v] = fr[v]
                        if split:
                            for v in T.unroll(VF):
                                fr[v] = rna(fv[v] - fr[v])
                            for v in T.vectorized(VF):
                                fs[MP + (it * threads + tx) // FR, ((it * threads + tx) % FR) * VF + v] = fr[v]
                T.sync_threads()
                # the next chunk's loads are issued before this chunk's MMAs
                if ch + 1 < NCH:
                    for it in T.unroll(XL):
                        if tok < Tn and k0 + bk + (it * TPT + g) * V < K:
                            for v in T.vectorized(V):
                                xv[it * V + v] = x[tok, k0 + bk + (it * TPT + g) * V + v]
                        else:
                            for v in T.unroll(V):
                                xv[it * V + v] = T.cast(0, dt)
                # acc[t, j] += sum_k x[t, k] * fn[j, k]   (this chunk, on tensor cores)
                T.gemm(xs, fs, acc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.sync_threads()
            # epilogue: per-token sums of squares (TPT partials in a fixed order), products added per token
            T.copy(acc, cs)
            sqp[tx] = sq
            T.sync_threads()
            if tx < bt:
                s = 0.0
                for u in T.serial(TPT):
                    s += sqp[tx * TPT + u]
                if fused:
                    s = T.rsqrt(s / K + eps)
                    rs[tx] = s
                    if bx * bt + tx < Tn:
                        rstd[bx * bt + tx] = s
                else:
                    if bx * bt + tx < Tn:
                        part_sq[bs, bx * bt + tx] = s
            T.sync_threads()
            for it in T.serial(OL):
                if it * threads + tx < bt * m:
                    if bx * bt + (it * threads + tx) // m < Tn:
                        if x_split:
                            s = ((cs[(it * threads + tx) // m, (it * threads + tx) % m]
                                  + cs[(it * threads + tx) // m, MP + (it * threads + tx) % m])
                                 + cs[bt + (it * threads + tx) // m, (it * threads + tx) % m]) \
                                + cs[bt + (it * threads + tx) // m, MP + (it * threads + tx) % m]
                        elif split:
                            s = cs[(it * threads + tx) // m, (it * threads + tx) % m] \
                                + cs[(it * threads + tx) // m, MP + (it * threads + tx) % m]
                        else:
                            s = cs[(it * threads + tx) // m, (it * threads + tx) % m]
                        if fused:
                            mixes[bx * bt + (it * threads + tx) // m, (it * threads + tx) % m] = \
                                s * rs[(it * threads + tx) // m]
                        else:
                            part_mix[bs, bx * bt + (it * threads + tx) // m, (it * threads + tx) % m] = s

    return norm_fn_fwd_mma


def _build_fwd_fused(n, C, dtype, cfg, rows=None, fold=False):
    cfg = dict(cfg, split_K=1)
    if cfg.get("mma", "fma") != "fma":
        return _build_fwd_mma(n, C, dtype, cfg, fused=True, rows=rows, fold=fold)
    return _build_fwd(n, C, dtype, cfg, fused=True, rows=rows, fold=fold)


def _build_fwd_splitk(n, C, dtype, cfg, rows=None, fold=False):
    cfg = dict(cfg, split_K=max(2, cfg["split_K"]))
    if cfg.get("mma", "fma") != "fma":
        return _build_fwd_mma(n, C, dtype, cfg, fused=False, rows=rows, fold=fold)
    return _build_fwd(n, C, dtype, cfg, fused=False, rows=rows, fold=fold)


def _build_fwd_partials(n, C, dtype, cfg, rows=None, fold=False):
    """The main loop writing split partials for any ``split_K`` (1 included): ``mhc_pre``'s projection,
    whose reduce stage is the fused tail kernel (``fused.py``)."""
    if cfg.get("mma", "fma") != "fma":
        return _build_fwd_mma(n, C, dtype, cfg, fused=False, rows=rows, fold=fold)
    return _build_fwd(n, C, dtype, cfg, fused=False, rows=rows, fold=fold)


def split_reduce_macros(S: int, K: int):
    """How the ``S`` split partials become one token's values, shared by :func:`_build_fwd_finalize` and the
    fused ``mhc_pre`` tail (``fused.py``) so the two round identically: sums in split order from 0.0, and
    ``rstd = rsqrt(sum / K + norm_eps)``."""
    import tilelang.language as T

    @T.macro
    def split_sum(part_mix, tok, j):
        acc = T.alloc_var("float32")
        acc = 0.0
        for sp in T.serial(S):
            acc += part_mix[sp, tok, j]
        return acc

    @T.macro
    def split_rstd(part_sq, tok, norm_eps):
        acc = T.alloc_var("float32")
        acc = 0.0
        for sp in T.serial(S):
            acc += part_sq[sp, tok]
        return T.rsqrt(acc / K + norm_eps)

    return split_sum, split_rstd


def _build_fwd_finalize(n, C, dtype, cfg, rows=None):
    import tilelang.language as T

    m = rows or mix_rows(n)
    K = n * C
    S = cfg["split_K"]
    bt = 128
    Tn = T.dynamic("T")
    split_sum, split_rstd = split_reduce_macros(S, K)

    @T.prim_func
    def norm_fn_finalize(part_mix: T.Tensor((S, Tn, m), "float32"), part_sq: T.Tensor((S, Tn), "float32"),  # in
                         mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),            # out
                         eps: T.float32):                                                                  # constant
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            r = T.alloc_var("float32")
            tok = bx * bt + tx
            if tok < Tn:
                # rstd = rsqrt(sum_s part_sq[s] / K + eps);  mixes = (sum_s part_mix[s]) * rstd
                r = split_rstd(part_sq, tok, eps)
                rstd[tok] = r
                for j in T.serial(m):
                    mixes[tok, j] = split_sum(part_mix, tok, j) * r

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
    bt, bq = cfg["dx_block_T"], cfg["block_K"]
    threads = bq
    GL = cdiv(bt * m, threads)
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_bwd_dx(g: T.Tensor((Tn, m), "float32"),                                          # gradient in
                       x: T.Tensor((Tn, K), dt), fn: T.Tensor((m, K), "float32"),                # saved inputs
                       mixes: T.Tensor((Tn, m), "float32"), rstd: T.Tensor((Tn,), "float32"),
                       w: T.Tensor((Tn, n), "float32"), g_apply: T.Tensor((Tn, C), dt),          # extra terms
                       g_res: T.Tensor((Tn, K), dt),
                       dx: T.Tensor((Tn, K), dt)):                                               # gradient out
        with T.Kernel(T.ceildiv(Tn, bt), T.ceildiv(K, bq), threads=threads) as (by, bx):
            tx = T.get_thread_binding(0)
            grs = T.alloc_shared((bt, m), "float32")    # g * rstd
            coef = T.alloc_shared((bt,), "float32")     # rstd^2 / K * (g . mixes)
            f = T.alloc_local((m,), "float32")
            acc = T.alloc_var("float32")
            q = bx * bq + tx
            if q < K:
                for j in T.unroll(m):
                    f[j] = fn[j, q]
            for it in T.serial(GL):
                idx = it * threads + tx
                if idx < bt * m:
                    t = idx // m
                    row = idx % m   # (distinct names: TileLang binds each once; m = 1 folds the loops above)
                    tok = by * bt + t
                    if tok < Tn:
                        grs[t, row] = g[tok, row] * rstd[tok]
                    else:
                        grs[t, row] = 0.0
            if tx < bt:
                tok = by * bt + tx
                if tok < Tn:
                    acc = 0.0
                    for jm in T.serial(m):
                        acc += g[tok, jm] * mixes[tok, jm]
                    coef[tx] = rstd[tok] * rstd[tok] / K * acc
                else:
                    coef[tx] = 0.0
            T.sync_threads()
            if q < K:
                # dx[t, q] = sum_j g[t, j] rstd[t] fn[j, q] - coef[t] x[t, q]  (+ w[t, i] g_apply[t, c] + g_res[t, q])
                for t in T.serial(bt):
                    tok = by * bt + t
                    if tok < Tn:
                        acc = 0.0
                        for jf in T.unroll(m):
                            acc += grs[t, jf] * f[jf]
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
    bt, bq, S = cfg["dfn_block_T"], cfg["block_K"], cfg["split_T"]
    threads = bq
    GL = cdiv(bt * m, threads)
    Tn = T.dynamic("T")

    @T.prim_func
    def norm_fn_bwd_dfn(g: T.Tensor((Tn, m), "float32"),                                        # gradient in
                        x: T.Tensor((Tn, K), dt), rstd: T.Tensor((Tn,), "float32"),              # saved inputs
                        part_dfn: T.Tensor((S, m, K), "float32")):                               # partial gradients out
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
            for j in T.unroll(m):
                acc[j] = 0.0
            for blk in T.serial(b1 - b0):
                tok0 = (b0 + blk) * bt
                for it in T.serial(GL):
                    idx = it * threads + tx
                    if idx < bt * m:
                        t = idx // m
                        row = idx % m   # (distinct names: TileLang binds each once; m = 1 folds the loops)
                        if tok0 + t < Tn:
                            grs[t, row] = g[tok0 + t, row] * rstd[tok0 + t]
                        else:
                            grs[t, row] = 0.0
                T.sync_threads()
                # part_dfn[s, j, q] += sum_t g[t, j] rstd[t] x[t, q]   (this split's tokens, in token order)
                if q < K:
                    for t in T.serial(bt):
                        if tok0 + t < Tn:
                            xq = T.cast(x[tok0 + t, q], "float32")
                            for ja in T.unroll(m):
                                acc[ja] += grs[t, ja] * xq
                T.sync_threads()
            if q < K:
                for jo in T.unroll(m):
                    part_dfn[bs, jo, q] = acc[jo]

    return norm_fn_bwd_dfn


kernel_def(KernelDef("norm_fn_fwd", "norm_fn", _build_fwd_fused, FUSED_KEYS, aot_T=65536))
kernel_def(KernelDef("norm_fn_fwd_splitk", "norm_fn", _build_fwd_splitk, FWD_KEYS, aot_T=16))
kernel_def(KernelDef("mhc_pre_project", "norm_fn", _build_fwd_partials, FWD_KEYS))
kernel_def(KernelDef("norm_fn_finalize", "norm_fn", _build_fwd_finalize, FIN_KEYS, aot_T=16))
kernel_def(KernelDef("norm_fn_bwd_dx", "norm_fn_bwd", _build_bwd_dx, DX_KEYS))
kernel_def(KernelDef("mhc_pre_bwd_dx", "norm_fn_bwd", _build_bwd_dx, DX_KEYS,
                     lambda s: {"apply": True, "residual_grad": True}))
kernel_def(KernelDef("norm_fn_bwd_dfn", "norm_fn_bwd", _build_bwd_dfn, DFN_KEYS))


# -- launch wrappers -----------------------------------------------------------------------------------
def _fold(fn, norm_weight):
    return fn.contiguous() if norm_weight is None else (fn * norm_weight).contiguous()


def fold_args(fn, norm_weight, mma):
    """-> (fn, norm_weight, kernel constants) as a forward projection takes them: the "fma" kernels fold
    ``norm_weight`` into ``fn`` as they stage it (constant ``fold``; ``fn * norm_weight`` in torch would be a
    launch of its own), the tensor-core ones take ``fn`` folded by torch. Where the kernel does not read
    ``norm_weight`` it gets a placeholder (``torch.empty``: no launch)."""
    K = fn.shape[1]
    if norm_weight is not None and mma == "fma":
        return fn.contiguous(), norm_weight.contiguous(), {"fold": True}
    return _fold(fn, norm_weight), fn.new_empty((K,)), {}


def norm_fn_fwd(residual, fn, norm_weight, norm_eps, *, config):
    """-> (mixes (T, rows), rstd (T,)); ``rows`` is fn's row count (m, or n for the head)."""
    Tt, n, C = residual.shape
    m = fn.shape[0]
    rows = None if m == mix_rows(n) else m
    mixes = fn.new_empty((Tt, m))
    rstd = fn.new_empty((Tt,))
    if Tt == 0:
        return mixes, rstd
    cfg = config  # resolved by the core (registry.config_for)
    _check_mode(cfg["mma"])
    x = residual.view(Tt, n * C)
    f, nw, fc = fold_args(fn, norm_weight, cfg["mma"])
    S = cfg["split_K"]
    dev = residual.device
    if S == 1:
        dummy = fn.new_empty((1, Tt, m)), fn.new_empty((1, Tt))
        get_kernel("norm_fn_fwd", n, C, residual.dtype, cfg, dev, rows=rows, **fc)(
            x, f, nw, mixes, rstd, *dummy, float(norm_eps))
    else:
        pm = fn.new_empty((S, Tt, m))
        ps = fn.new_empty((S, Tt))
        get_kernel("norm_fn_fwd_splitk", n, C, residual.dtype, cfg, dev, rows=rows, **fc)(
            x, f, nw, mixes, rstd, pm, ps, float(norm_eps))
        get_kernel("norm_fn_finalize", n, C, residual.dtype, cfg, dev, rows=rows)(pm, ps, mixes, rstd, float(norm_eps))
    return mixes, rstd


def norm_fn_partials(residual, fn, norm_weight, *, config):
    """-> (part_mix (S, T, m), part_sq (S, T)): the projection's per-split partial dot products and sums of
    squares, unnormalised (``config``: the projection's, whose ``split_K`` may be 1); ``fused.mhc_pre_tail``
    reduces them."""
    Tt, n, C = residual.shape
    m = fn.shape[0]
    cfg = config  # resolved by the core (registry.config_for)
    _check_mode(cfg["mma"])
    S = cfg["split_K"]
    pm = fn.new_empty((S, Tt, m))
    ps = fn.new_empty((S, Tt))
    if Tt == 0:
        return pm, ps
    unused = fn.new_empty((Tt, m)), fn.new_empty((Tt,))  # the finalised outputs, which this kernel leaves alone
    f, nw, fc = fold_args(fn, norm_weight, cfg["mma"])
    get_kernel("mhc_pre_project", n, C, residual.dtype, cfg, residual.device, **fc)(
        residual.view(Tt, n * C), f, nw, *unused, pm, ps, 0.0)
    return pm, ps


def norm_fn_bwd(grad_mixes, residual, fn, norm_weight, mixes, rstd, *, config, apply_w=None, apply_grad=None,
                grad_residual=None):
    """-> (d_residual, d_fn_eff); d_fn_eff is the gradient of fn * norm_weight. Optionally adds
    ``apply_w[t, i] * apply_grad[t, c]`` and ``grad_residual`` to d_residual in float32 before its single
    rounding (a whole site's pre side in one full-size write)."""
    Tt, n, C = residual.shape
    m = fn.shape[0]
    K = n * C
    rows = None if m == mix_rows(n) else m
    d_res = torch.empty_like(residual)
    if Tt == 0:
        return d_res, fn.new_zeros((m, K))
    cfg = config
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
    part = fn.new_empty((cfg["split_T"], m, K))
    get_kernel("norm_fn_bwd_dfn", n, C, residual.dtype, cfg, dev, rows=rows)(g, x, rstd, part)
    return d_res, part.sum(0)
