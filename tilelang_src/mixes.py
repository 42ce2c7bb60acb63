"""``split_mixes`` and ``sinkhorn``, forward and backward: one thread per token.

The per-token state (the ``m = n(n+2)`` mixes, the ``n x n`` Sinkhorn matrix, its
gradient and the row/column sums) lives in registers; these tensors are tiny next
to the residual, so the kernels are latency- not bandwidth-bound.

The backward kernels recompute the Sinkhorn iterations and run them in reverse,
giving the exact gradient of the unrolled, eps-regularised iterations (contract §9).
Round inputs are checkpointed in shared memory (laid out ``[slot, element, token]``
so a warp's accesses hit distinct banks); the reverse pass recomputes the round's
row sums, column sums and normalised iterate from its checkpoint. With the config's
``ck_stride = 1`` every round's input is kept (``iters`` slots: shared memory about
``iters * n * n * block_T * 4`` bytes). When that does not fit for a block of 16
tokens under 96 KB (large ``n * iters``), the default heuristic raises ``ck_stride``
to ``s``: only every ``s``-th round input is kept (``1 + ceil((iters - 1) / s)``
slots) and the reverse pass rebuilds a round's input by re-running the at most
``s - 1`` rounds since the nearest checkpoint (``~iters * s / 2`` extra rounds
instead of failing). ``supports`` refuses only what does not fit even then.

The cross-token sums of ``split_mixes_bwd`` (``d_base``, ``d_scale``) are reduced
per CTA in a fixed order into per-block partials and then summed over blocks by
the wrapper, so they are deterministic and need no atomics.

Compile-time: ``n``, ``iters``, the config (``block_T`` tokens = threads per CTA).
Runtime scalars: ``pre_eps``, ``post_mult``, ``sinkhorn_eps``.
"""

import torch

from mhc_kernels.specs import stream_count

from .common import KernelDef, Shape, cdiv, get_kernel, kernel_def

KEYS = ("block_T",)
BWD_KEYS = ("block_T", "ck_stride")
BWD_OPS = ("split_mixes_bwd", "sinkhorn_bwd")
SMEM_BUDGET = 96 * 1024   # shared bytes per CTA we aim to stay under (fits sm_86/89's 99 KB too)
SMEM_MAX = 160 * 1024     # hard cap: below sm_80's 163 KB and sm_90/sm_100's 227 KB opt-in limits
MIN_BWD_BLOCK_T = 16      # below this many tokens per CTA, trade recompute for checkpoint memory


def ck_slots(iters: int, stride: int) -> int:
    """Checkpoint slots of the backward kernels: the softmax S, then every ``stride``-th round input."""
    return 1 + -(-(iters - 1) // stride)


def _ck_bytes(n: int, iters: int, stride: int = 1) -> int:
    """Shared bytes per token of the backward kernels: the checkpoints, plus split_mixes_bwd's
    two per-token rows of the d_base / d_scale partial sums and its parked raw comb mixes (counted
    for both, conservatively)."""
    return ck_slots(iters, stride) * n * n * 4 + (2 * n * (n + 2) + n * n) * 4


def _max_stride(iters: int) -> int:
    return max(1, iters - 1)


def default_config(op: str, s: Shape, iters: int = 20) -> dict:
    if op in BWD_OPS:
        bt = 128
        while bt > MIN_BWD_BLOCK_T and bt * _ck_bytes(s.n, iters) > SMEM_BUDGET:
            bt //= 2
        stride = 1
        while stride < _max_stride(iters) and bt * _ck_bytes(s.n, iters, stride) > SMEM_BUDGET:
            stride += 1
        while bt > 1 and bt * _ck_bytes(s.n, iters, stride) > SMEM_MAX:
            bt //= 2
        return {"block_T": bt, "ck_stride": stride}
    return {"block_T": 128}


def config_space(op: str, s: Shape, iters: int = 20) -> list[dict]:
    out = []
    strides = sorted({min(st, _max_stride(iters)) for st in (1, 2, 4)}) if op in BWD_OPS else [None]
    for bt in (32, 64, 128, 256):
        for stride in strides:
            if stride is None:
                out.append({"block_T": bt})
            elif bt * _ck_bytes(s.n, iters, stride) <= SMEM_MAX:
                out.append({"block_T": bt, "ck_stride": stride})
    d = default_config(op, s, iters)
    if d not in out:
        out.insert(0, d)
    return out


def bwd_supported(n: int, iters: int):
    least = _ck_bytes(n, iters, _max_stride(iters))
    if least > SMEM_MAX:
        return (f"TileLang Sinkhorn backward needs at least {least} bytes of shared memory per token for its "
                f"checkpoints at n={n}, iters={iters} (limit {SMEM_MAX}); another backend serves it")
    return None


# -- shared TIR snippets ---------------------------------------------------------------------------
def _macros(n: int):
    import tilelang.language as T

    @T.macro
    def softmax_rows(L, S):
        # S = softmax(L, dim=-1) on an n*n row-major local array (S may be L: in place)
        for i in T.unroll(n):
            mx = T.alloc_var("float32")
            mx = L[i * n]
            for j in T.unroll(1, n):
                mx = T.max(mx, L[i * n + j])
            sm = T.alloc_var("float32")
            sm = 0.0
            for j in T.unroll(n):
                S[i * n + j] = T.exp(L[i * n + j] - mx)
                sm += S[i * n + j]
            for j in T.unroll(n):
                S[i * n + j] = S[i * n + j] / sm

    @T.macro
    def norm_rows(P, den, eps):
        # P = P / (P.sum(-1) + eps); den = the row denominators
        for i in T.unroll(n):
            den[i] = eps
            for j in T.unroll(n):
                den[i] += P[i * n + j]
            for j in T.unroll(n):
                P[i * n + j] = P[i * n + j] / den[i]

    @T.macro
    def norm_cols(P, den, eps):
        # P = P / (P.sum(-2) + eps); den = the column denominators
        for j in T.unroll(n):
            den[j] = eps
            for i in T.unroll(n):
                den[j] += P[i * n + j]
            for i in T.unroll(n):
                P[i * n + j] = P[i * n + j] / den[j]

    @T.macro
    def col_bwd(G, Q, den):
        # y = Q / den (per column), G <- (G - colsum(G * y)) / den
        for j in T.unroll(n):
            acc = T.alloc_var("float32")
            acc = 0.0
            for i in T.unroll(n):
                acc += G[i * n + j] * (Q[i * n + j] / den[j])
            for i in T.unroll(n):
                G[i * n + j] = (G[i * n + j] - acc) / den[j]

    @T.macro
    def row_bwd(G, Y, den):
        # y = Y (already normalised per row by den), G <- (G - rowsum(G * y)) / den
        for i in T.unroll(n):
            acc = T.alloc_var("float32")
            acc = 0.0
            for j in T.unroll(n):
                acc += G[i * n + j] * Y[i * n + j]
            for j in T.unroll(n):
                G[i * n + j] = (G[i * n + j] - acc) / den[i]

    @T.macro
    def sinkhorn_fwd(P, den, eps, iters):
        """P holds the logits on entry and the result on exit."""
        # P = softmax(L) + eps; P = P / (P.sum(-2) + eps)        (round 1)
        softmax_rows(P, P)
        for e in T.unroll(n * n):
            P[e] = P[e] + eps
        norm_cols(P, den, eps)
        # iters - 1 times: rows, then columns
        for _ in T.serial(iters - 1):
            norm_rows(P, den, eps)
            norm_cols(P, den, eps)

    @T.macro
    def round_bwd(G, P, den, den2, eps):
        # P = a round's input on entry; G <- dL/d(round input), from dL/d(round output)
        norm_rows(P, den2, eps)    # P = Q (row-normalised input), den2 = row denominators
        for j in T.unroll(n):      # den = column denominators of Q
            den[j] = eps
            for i in T.unroll(n):
                den[j] += P[i * n + j]
        # through the column step, then the row step
        col_bwd(G, P, den)
        row_bwd(G, P, den2)

    @T.macro
    def sinkhorn_bwd(G, P, den, den2, ck, tx, eps, iters, stride):
        """On entry P = the logits, G = dL/dP_out; on exit G = dL/dlogits.

        ck: shared [ck_slots(iters, stride), n*n, block_T]. Slot 0 holds S = softmax(logits);
        slot 1 + s the input of round s * stride (0-based rounds r = 0 .. iters-2), the start of
        segment s. Every slot index is affine in the loop counters (no ``r // stride``): TileLang's
        barrier planner then proves each thread's slots its own, so it needs no barrier here.
        """
        nseg = ck_slots(iters, stride) - 1
        # forward again, checkpointing S and the input of every segment's first round
        softmax_rows(P, P)
        for e in T.unroll(n * n):
            ck[0, e, tx] = P[e]
            P[e] = P[e] + eps
        norm_cols(P, den, eps)
        if stride == 1:
            for r in T.serial(iters - 1):
                for e in T.unroll(n * n):
                    ck[r + 1, e, tx] = P[e]
                norm_rows(P, den, eps)
                norm_cols(P, den, eps)
        else:
            for sg in T.serial(nseg):
                for e in T.unroll(n * n):
                    ck[1 + sg, e, tx] = P[e]
                for _q in T.serial(T.min(stride, iters - 1 - sg * stride)):
                    norm_rows(P, den, eps)
                    norm_cols(P, den, eps)
        # reverse the rounds: P <- the round's input, from its checkpoint
        if stride == 1:
            for rr in T.serial(iters - 1):
                for e in T.unroll(n * n):
                    P[e] = ck[iters - 1 - rr, e, tx]
                round_bwd(G, P, den, den2, eps)
        else:
            # segments last to first, each one's rounds last to first: round j of the segment is rebuilt
            # by re-running j rounds from the segment's checkpoint
            for rs in T.serial(nseg):
                for jj in T.serial(T.min(stride, iters - 1 - (nseg - 1 - rs) * stride)):
                    for e in T.unroll(n * n):
                        P[e] = ck[nseg - rs, e, tx]
                    for _q in T.serial(T.min(stride, iters - 1 - (nseg - 1 - rs) * stride) - 1 - jj):
                        norm_rows(P, den, eps)
                        norm_cols(P, den, eps)
                    round_bwd(G, P, den, den2, eps)
        # iteration 1's column step on S + eps, then the softmax
        for e in T.unroll(n * n):
            P[e] = ck[0, e, tx] + eps
        for j in T.unroll(n):
            den[j] = eps
            for i in T.unroll(n):
                den[j] += P[i * n + j]
        col_bwd(G, P, den)
        # dL/dL = (G - rowsum(G * S)) * S   (the softmax)
        for e in T.unroll(n * n):
            P[e] = ck[0, e, tx]
        for i in T.unroll(n):
            acc = T.alloc_var("float32")
            acc = 0.0
            for j in T.unroll(n):
                acc += G[i * n + j] * P[i * n + j]
            for j in T.unroll(n):
                G[i * n + j] = (G[i * n + j] - acc) * P[i * n + j]

    return sinkhorn_fwd, sinkhorn_bwd


def split_post_comb_macro(n: int):
    """``post`` and the Sinkhorn ``comb`` of one token from its mixes row (contract §3), shared by
    ``split_mixes_fwd`` and the fused ``mhc_pre`` tail (``fused.py``)."""
    import tilelang.language as T

    sk_fwd, _ = _macros(n)

    @T.macro
    def split_post_comb(mixes, scale, base, tok, post, comb, P, den, post_mult, eps, iters):
        # post = sigmoid(mixes[n:2n] * scale1 + base[n:2n]) * post_mult
        for i in T.unroll(n):
            post[tok, i] = T.sigmoid(mixes[tok, n + i] * scale[1] + base[n + i]) * post_mult
        # comb = sinkhorn(mixes[2n:] * scale2 + base[2n:])
        for e in T.unroll(n * n):
            P[e] = mixes[tok, 2 * n + e] * scale[2] + base[2 * n + e]
        sk_fwd(P, den, eps, iters)
        for e in T.unroll(n * n):
            comb[tok, e // n, e % n] = P[e]

    return split_post_comb


# -- kernels ------------------------------------------------------------------------------------------
def _build_sinkhorn_fwd(n, C, dtype, cfg, iters):
    import tilelang.language as T

    bt = cfg["block_T"]
    nn = n * n
    Tn = T.dynamic("T")
    sk_fwd, _ = _macros(n)

    @T.prim_func
    def sinkhorn_fwd(logits: T.Tensor((Tn, n, n), "float32"),      # input
                     out: T.Tensor((Tn, n, n), "float32"),         # output
                     eps: T.float32):                              # constant
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            P = T.alloc_local((nn,), "float32")
            den = T.alloc_local((n,), "float32")
            tok = bx * bt + tx
            if tok < Tn:
                # out[t] = sinkhorn(logits[t]), one token per thread
                for e in T.unroll(nn):
                    P[e] = logits[tok, e // n, e % n]
                sk_fwd(P, den, eps, iters)
                for e in T.unroll(nn):
                    out[tok, e // n, e % n] = P[e]

    return sinkhorn_fwd


def _build_sinkhorn_bwd(n, C, dtype, cfg, iters):
    import tilelang.language as T

    bt = cfg["block_T"]
    stride = cfg["ck_stride"]
    nn = n * n
    Tn = T.dynamic("T")
    _, sk_bwd = _macros(n)

    @T.prim_func
    def sinkhorn_bwd(grad: T.Tensor((Tn, n, n), "float32"),        # gradient in
                     logits: T.Tensor((Tn, n, n), "float32"),      # saved input
                     dlogits: T.Tensor((Tn, n, n), "float32"),     # gradient out
                     eps: T.float32):                              # constant
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            ck = T.alloc_shared((ck_slots(iters, stride), nn, bt), "float32")
            G = T.alloc_local((nn,), "float32")
            P = T.alloc_local((nn,), "float32")
            den = T.alloc_local((n,), "float32")
            den2 = T.alloc_local((n,), "float32")
            tok = bx * bt + tx
            if tok < Tn:
                for e in T.unroll(nn):
                    P[e] = logits[tok, e // n, e % n]
                    G[e] = grad[tok, e // n, e % n]
                # dlogits[t] = the exact gradient of the unrolled rounds (recompute, then reverse)
                sk_bwd(G, P, den, den2, ck, tx, eps, iters, stride)
                for e in T.unroll(nn):
                    dlogits[tok, e // n, e % n] = G[e]

    return sinkhorn_bwd


def _build_split_fwd(n, C, dtype, cfg, iters):
    import tilelang.language as T

    bt = cfg["block_T"]
    nn = n * n
    m = n * (n + 2)
    Tn = T.dynamic("T")
    split_post_comb = split_post_comb_macro(n)

    @T.prim_func
    def split_mixes_fwd(mixes: T.Tensor((Tn, m), "float32"), scale: T.Tensor((3,), "float32"),   # inputs
                        base: T.Tensor((m,), "float32"),
                        pre: T.Tensor((Tn, n), "float32"), post: T.Tensor((Tn, n), "float32"),   # outputs
                        comb: T.Tensor((Tn, n, n), "float32"),
                        pre_eps: T.float32, post_mult: T.float32, eps: T.float32):               # constants
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            P = T.alloc_local((nn,), "float32")
            den = T.alloc_local((n,), "float32")
            tok = bx * bt + tx
            if tok < Tn:
                # pre = sigmoid(mixes[:n] * scale0 + base[:n]) + pre_eps
                for i in T.unroll(n):
                    pre[tok, i] = T.sigmoid(mixes[tok, i] * scale[0] + base[i]) + pre_eps
                split_post_comb(mixes, scale, base, tok, post, comb, P, den, post_mult, eps, iters)

    return split_mixes_fwd


def _build_split_bwd(n, C, dtype, cfg, iters):
    import tilelang.language as T

    bt = cfg["block_T"]
    stride = cfg["ck_stride"]
    nn = n * n
    m = n * (n + 2)
    Tn = T.dynamic("T")
    _, sk_bwd = _macros(n)
    NR = cdiv(m, bt)

    @T.prim_func
    def split_mixes_bwd(g_pre: T.Tensor((Tn, n), "float32"), g_post: T.Tensor((Tn, n), "float32"),   # gradients in
                        g_comb: T.Tensor((Tn, n, n), "float32"),
                        mixes: T.Tensor((Tn, m), "float32"), scale: T.Tensor((3,), "float32"),   # saved inputs
                        base: T.Tensor((m,), "float32"),
                        d_mixes: T.Tensor((Tn, m), "float32"),                                   # gradients out
                        part_base: T.Tensor((T.ceildiv(Tn, bt), m), "float32"),                  # per-block partials
                        part_scale: T.Tensor((T.ceildiv(Tn, bt), m), "float32"),
                        post_mult: T.float32, eps: T.float32):                                   # constants
        with T.Kernel(T.ceildiv(Tn, bt), threads=bt) as bx:
            tx = T.get_thread_binding(0)
            ck = T.alloc_shared((ck_slots(iters, stride), nn, bt), "float32")
            dz_s = T.alloc_shared((m, bt), "float32")
            dzm_s = T.alloc_shared((m, bt), "float32")
            raw_s = T.alloc_shared((nn, bt), "float32")
            G = T.alloc_local((nn,), "float32")
            P = T.alloc_local((nn,), "float32")
            den = T.alloc_local((n,), "float32")
            den2 = T.alloc_local((n,), "float32")
            tok = bx * bt + tx
            if tok < Tn:
                # dz = g * sigmoid'(z) (pre) and g * post_mult * sigmoid'(z) (post); d_mixes = dz * s
                for i in T.unroll(n):
                    z = T.alloc_var("float32")
                    z = mixes[tok, i] * scale[0] + base[i]
                    dz = T.alloc_var("float32")
                    dz = g_pre[tok, i] * (T.sigmoid(z) * T.sigmoid(-z))
                    d_mixes[tok, i] = dz * scale[0]
                    dz_s[i, tx] = dz
                    dzm_s[i, tx] = dz * mixes[tok, i]
                    z = mixes[tok, n + i] * scale[1] + base[n + i]
                    dz = g_post[tok, i] * post_mult * (T.sigmoid(z) * T.sigmoid(-z))
                    d_mixes[tok, n + i] = dz * scale[1]
                    dz_s[n + i, tx] = dz
                    dzm_s[n + i, tx] = dz * mixes[tok, n + i]
                for e in T.unroll(nn):
                    # park the raw comb mixes in shared memory: keeping them in registers across the
                    # Sinkhorn recompute would spill at n=8 (so would re-reading them from global memory:
                    # nvcc keeps the first load). A buffer of their own, written once: parked in dzm_s and
                    # overwritten there, TileLang's barrier planner saw a conflict inside this branch it
                    # could not fence (a ThreadSync warning, test_tilelang_compile)
                    raw_s[e, tx] = mixes[tok, 2 * n + e]
                    P[e] = raw_s[e, tx] * scale[2] + base[2 * n + e]
                    G[e] = g_comb[tok, e // n, e % n]
                # dz[2n:] = the Sinkhorn backward of g_comb; d_mixes = dz * scale2
                sk_bwd(G, P, den, den2, ck, tx, eps, iters, stride)
                for e in T.unroll(nn):
                    d_mixes[tok, 2 * n + e] = G[e] * scale[2]
                    dz_s[2 * n + e, tx] = G[e]
                    dzm_s[2 * n + e, tx] = G[e] * raw_s[e, tx]
            else:
                for r in T.unroll(m):
                    dz_s[r, tx] = 0.0
                    dzm_s[r, tx] = 0.0
            T.sync_threads()
            # part_base[b] = sum_t dz, part_scale[b] = sum_t dz * mixes: per-block partial sums over the
            # block's tokens, in token order
            for q in T.serial(NR):
                r = q * bt + tx
                if r < m:
                    sb = T.alloc_var("float32")
                    ss = T.alloc_var("float32")
                    sb = 0.0
                    ss = 0.0
                    for t in T.serial(bt):
                        sb += dz_s[r, t]
                        ss += dzm_s[r, t]
                    part_base[bx, r] = sb
                    part_scale[bx, r] = ss

    return split_mixes_bwd


def _iters(s: Shape) -> dict:
    return {"iters": 20}


kernel_def(KernelDef("split_mixes_fwd", "split_mixes", _build_split_fwd, KEYS, _iters, act_dependent=False))
kernel_def(KernelDef("split_mixes_bwd", "split_mixes_bwd", _build_split_bwd, BWD_KEYS, _iters,
                     act_dependent=False))
kernel_def(KernelDef("sinkhorn_fwd", "sinkhorn", _build_sinkhorn_fwd, KEYS, _iters, act_dependent=False))
kernel_def(KernelDef("sinkhorn_bwd", "sinkhorn_bwd", _build_sinkhorn_bwd, BWD_KEYS, _iters,
                     act_dependent=False))


def check_config(op: str, n: int, iters: int, cfg: dict):
    """Why ``cfg`` cannot run ``op`` at ``n`` streams and ``iters`` rounds (None if it can). A tuned entry is
    keyed without the iteration count: one tuned at the default 20 may need too much shared memory for a
    much larger count; the core then keeps the heuristic, which always fits."""
    if op in BWD_OPS and cfg["block_T"] * _ck_bytes(n, iters, cfg["ck_stride"]) > SMEM_MAX:
        return (f"{op}: block_T={cfg['block_T']} with ck_stride={cfg['ck_stride']} needs more than "
                f"{SMEM_MAX} bytes of shared memory at n={n}, iters={iters}")
    return None


# -- launch wrappers (torch_ref signatures + the config the core resolved) -----------------------------
def sinkhorn_fwd(logits, iters, eps, *, config):
    Tt, n, _ = logits.shape
    out = torch.empty_like(logits)
    if Tt == 0:
        return out
    get_kernel("sinkhorn_fwd", n, 1, torch.float32, config, logits.device, iters=int(iters))(logits, out, float(eps))
    return out


def sinkhorn_bwd(grad, logits, iters, eps, *, config):
    Tt, n, _ = logits.shape
    out = torch.empty_like(logits)
    if Tt == 0:
        return out
    get_kernel("sinkhorn_bwd", n, 1, torch.float32, config, logits.device, iters=int(iters))(
        grad, logits, out, float(eps))
    return out


def split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps, *, config):
    Tt, m = mixes.shape
    n = stream_count(m)
    pre = mixes.new_empty((Tt, n))
    post = mixes.new_empty((Tt, n))
    comb = mixes.new_empty((Tt, n, n))
    if Tt == 0:
        return pre, post, comb
    get_kernel("split_mixes_fwd", n, 1, torch.float32, config, mixes.device, iters=int(iters))(
        mixes, scale, base, pre, post, comb, float(pre_eps), float(post_mult), float(sinkhorn_eps))
    return pre, post, comb


def split_mixes_bwd(grad_pre, grad_post, grad_comb, mixes, scale, base, post_mult, iters, sinkhorn_eps, *,
                    config):
    Tt, m = mixes.shape
    n = stream_count(m)
    d_mixes = mixes.new_empty((Tt, m))
    if Tt == 0:
        return d_mixes, scale.new_zeros((3,)), base.new_zeros((m,))
    nb = cdiv(Tt, config["block_T"])
    part_base = mixes.new_empty((nb, m))
    part_scale = mixes.new_empty((nb, m))
    get_kernel("split_mixes_bwd", n, 1, torch.float32, config, mixes.device, iters=int(iters))(
        grad_pre.contiguous(), grad_post.contiguous(), grad_comb.contiguous(), mixes, scale, base, d_mixes,
        part_base, part_scale, float(post_mult), float(sinkhorn_eps))
    d_base = part_base.sum(0)
    per_col = part_scale.sum(0)
    d_scale = torch.stack([per_col[:n].sum(), per_col[n:2 * n].sum(), per_col[2 * n:].sum()])
    return d_mixes, d_scale, d_base
