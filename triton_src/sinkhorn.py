"""Triton kernels for ``split_mixes`` and ``sinkhorn`` (contract §3), forward and backward (contract §9).

Every kernel gives a program ``BLOCK_T`` tokens and keeps their ``n x n`` matrices
in registers as a ``(BLOCK_T, n, n)`` float32 tile (n in {1, 2, 4, 8}: all powers
of two, so no padding). Axis 2 of the tile is ``dim=-1`` (a row ``i``: sum over
``j``), axis 1 is ``dim=-2`` (a column ``j``: sum over ``i``).

``sinkhorn(L)`` with ``I = iters``, ``e = eps`` (contract §3)::

    P = softmax(L, dim=-1) + e;  P = P / (P.sum(dim=-2) + e)                  # step 0
    repeat I - 1 times: P = P / (P.sum(dim=-1) + e); P = P / (P.sum(dim=-2) + e)

``split_mixes``: ``z = mixes * s + base`` with ``s = [scale0]*n + [scale1]*n +
[scale2]*n*n``; ``pre_mix = sigmoid(z[:n]) + pre_eps``, ``post_mix = sigmoid(z[n:2n]) *
post_mult``, ``comb_mix = sinkhorn(z[2n:].reshape(n, n))`` -- one kernel.

Backward: the exact gradient of the unrolled iterations. A normalisation
``y = p / (sum_d p + e)`` along ``d`` has ``dL/dp = (g - sum_d(g * y)) / (sum_d p + e)``,
the softmax ``dL/dL = (g - sum_j(g * S)) * S``. Running the ``2I - 1`` steps in
reverse needs, at reverse step ``k``, that step's output ``y_k`` and denominator.

Recompute choice: the reverse pass recomputes the iterate entering round ``r`` from
the softmax each time (``r - 1`` rounds), so a token's backward costs about
``I^2 / 2`` rounds (171 at I = 20, against 20 in the forward) and holds only four
tiles (S, the gradient, the recomputed iterate and one step output). The
alternatives do not fit Triton's register model: the ``2I - 1`` iterates (or
``sqrt(I)`` checkpoints, or the per-step denominators) would have to be indexed
dynamically, i.e. spilled to a global scratch of up to ``2I * n * n`` floats per
token -- more memory traffic than the op's own inputs and outputs -- and
reconstructing earlier iterates from denominators alone (``p = y * den``) drifts by
an ulp per step. The recompute keeps the iterates bit-identical to the forward's,
and the extra work is small in absolute terms: the op moves ``O(n^2)`` bytes per
token against the ``O(n*C)`` of the site's residual kernels.

Reductions over tokens (``d_scale``, ``d_base``) are written as one float32 partial
per program and summed with ``torch.sum`` (fixed order, deterministic, no atomics).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import triton
import triton.language as tl

from mhc_kernels.specs import stream_count

from . import common


def _alloc(shape, dtype, device):
    """Output allocation (uninitialised); tests replace it with a NaN fill to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


# -- tile helpers (a tile is (BLOCK_T, N, N) float32) -------------------------------------------------
@triton.jit
def _rows_normalise(P, eps):
    """P / (P.sum(dim=-1) + eps) -> (y, denominator)."""
    den = tl.sum(P, axis=2)[:, :, None] + eps
    return P / den, den


@triton.jit
def _cols_normalise(P, eps):
    """P / (P.sum(dim=-2) + eps) -> (y, denominator)."""
    den = tl.sum(P, axis=1)[:, None, :] + eps
    return P / den, den


@triton.jit
def _softmax_rows(L):
    E = tl.exp(L - tl.max(L, axis=2)[:, :, None])
    return E / tl.sum(E, axis=2)[:, :, None]


@triton.jit
def _sinkhorn_tile(L, iters, eps):
    """contract §3 on a (BLOCK_T, N, N) tile of logits."""
    P, _ = _cols_normalise(_softmax_rows(L) + eps, eps)
    for _r in range(1, iters):
        P, _ = _rows_normalise(P, eps)
        P, _ = _cols_normalise(P, eps)
    return P


@triton.jit
def _sinkhorn_bwd_tile(G, L, iters, eps):
    """dL/dlogits for upstream gradient G (both (BLOCK_T, N, N)): the unrolled steps in reverse,
    each round's input recomputed from the softmax (see the module docstring)."""
    S = _softmax_rows(L)
    P0, den0 = _cols_normalise(S + eps, eps)          # step 0 (its output P0 starts every recompute)
    for rr in range(1, iters):
        r = iters - rr                                # round r = iters-1, ..., 1
        Q = P0
        for _k in range(1, r):                        # the iterate entering round r
            Q, _ = _rows_normalise(Q, eps)
            Q, _ = _cols_normalise(Q, eps)
        Y1, den_rows = _rows_normalise(Q, eps)
        Y2, den_cols = _cols_normalise(Y1, eps)
        G = (G - tl.sum(G * Y2, axis=1)[:, None, :]) / den_cols
        G = (G - tl.sum(G * Y1, axis=2)[:, :, None]) / den_rows
    G = (G - tl.sum(G * P0, axis=1)[:, None, :]) / den0
    return (G - tl.sum(G * S, axis=2)[:, :, None]) * S


# -- kernels -------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_fwd_kernel(
    logits_ptr,     # (T, N, N) fp32
    out_ptr,        # comb_mix (T, N, N) fp32
    T, iters, eps,
    N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, N)
    offs = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
    mask = (offs_t < T)[:, None, None]
    L = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _sinkhorn_tile(L, iters, eps), mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(
    grad_ptr,       # (T, N, N) fp32
    logits_ptr,     # (T, N, N) fp32
    d_ptr,          # d_logits (T, N, N) fp32
    T, iters, eps,
    N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),)."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, N)
    offs = offs_t[:, None, None] * (N * N) + offs_n[None, :, None] * N + offs_n[None, None, :]
    mask = (offs_t < T)[:, None, None]
    G = tl.load(grad_ptr + offs, mask=mask, other=0.0)
    L = tl.load(logits_ptr + offs, mask=mask, other=0.0)
    tl.store(d_ptr + offs, _sinkhorn_bwd_tile(G, L, iters, eps), mask=mask)


@triton.jit
def _split_mixes_tile(
    mixes_ptr,      # (T, M) fp32, M = N*(N+2)
    scale_ptr,      # (3,) fp32
    base_ptr,       # (M,) fp32
    pre_ptr,        # pre_mix (T, N) fp32
    post_ptr,       # post_mix (T, N) fp32
    comb_ptr,       # comb_mix (T, N, N) fp32
    offs_t,         # (BLOCK_T,) int32: the tokens of this tile
    t_mask,         # (BLOCK_T,) offs_t < T
    pre_eps, post_mult, iters, sinkhorn_eps,
    N: tl.constexpr,
):
    """split_mixes of the tokens ``offs_t``: loads their mixes rows, stores pre, post and comb. The one body of
    :func:`_split_mixes_fwd_kernel` and of the single-pass module's boundary tail (bit-identical results)."""
    M: tl.constexpr = N * (N + 2)
    offs_n = tl.arange(0, N)
    row = mixes_ptr + offs_t[:, None] * M
    nn = offs_n[None, :, None] * N + offs_n[None, None, :]     # (1, N, N): i*N + j

    z_pre = tl.load(row + offs_n[None, :], mask=t_mask[:, None], other=0.0) * tl.load(scale_ptr) \
        + tl.load(base_ptr + offs_n)[None, :]
    z_post = tl.load(row + N + offs_n[None, :], mask=t_mask[:, None], other=0.0) * tl.load(scale_ptr + 1) \
        + tl.load(base_ptr + N + offs_n)[None, :]
    z_comb = tl.load(row[:, :, None] + 2 * N + nn, mask=t_mask[:, None, None], other=0.0) * tl.load(scale_ptr + 2) \
        + tl.load(base_ptr + 2 * N + nn)

    tn = offs_t[:, None] * N + offs_n[None, :]
    tl.store(pre_ptr + tn, tl.sigmoid(z_pre) + pre_eps, mask=t_mask[:, None])
    tl.store(post_ptr + tn, tl.sigmoid(z_post) * post_mult, mask=t_mask[:, None])
    tl.store(comb_ptr + offs_t[:, None, None] * (N * N) + nn, _sinkhorn_tile(z_comb, iters, sinkhorn_eps),
             mask=t_mask[:, None, None])


@triton.jit
def _split_mixes_fwd_kernel(
    mixes_ptr,      # (T, M) fp32, M = N*(N+2)
    scale_ptr,      # (3,) fp32
    base_ptr,       # (M,) fp32
    pre_ptr,        # pre_mix (T, N) fp32
    post_ptr,       # post_mix (T, N) fp32
    comb_ptr,       # comb_mix (T, N, N) fp32
    T, pre_eps, post_mult, iters, sinkhorn_eps,
    N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),): :func:`_split_mixes_tile` of BLOCK_T tokens."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    _split_mixes_tile(mixes_ptr, scale_ptr, base_ptr, pre_ptr, post_ptr, comb_ptr, offs_t, offs_t < T,
                      pre_eps, post_mult, iters, sinkhorn_eps, N=N)


@triton.jit
def _split_mixes_bwd_kernel(
    gpre_ptr,       # grad_pre (T, N) fp32
    gpost_ptr,      # grad_post (T, N) fp32
    gcomb_ptr,      # grad_comb (T, N, N) fp32
    mixes_ptr,      # (T, M) fp32
    scale_ptr,      # (3,) fp32
    base_ptr,       # (M,) fp32
    dmixes_ptr,     # d_mixes (T, M) fp32
    part_scale_ptr,  # (programs, 3) fp32: this program's sum_t d_z * mixes per group
    part_base_ptr,  # (programs, M) fp32: this program's sum_t d_z
    T, post_mult, iters, sinkhorn_eps,
    N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid (cdiv(T, BLOCK_T),). d_z = dL/dz per group, d_mixes = d_z * s."""
    M: tl.constexpr = N * (N + 2)
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_n = tl.arange(0, N)
    row = mixes_ptr + offs_t[:, None] * M
    drow = dmixes_ptr + offs_t[:, None] * M
    nn = offs_n[None, :, None] * N + offs_n[None, None, :]
    tn = offs_t[:, None] * N + offs_n[None, :]
    tm2 = t_mask[:, None]
    tm3 = t_mask[:, None, None]
    s_pre = tl.load(scale_ptr)
    s_post = tl.load(scale_ptr + 1)
    s_comb = tl.load(scale_ptr + 2)

    m_pre = tl.load(row + offs_n[None, :], mask=tm2, other=0.0)
    z_pre = m_pre * s_pre + tl.load(base_ptr + offs_n)[None, :]
    dz_pre = tl.load(gpre_ptr + tn, mask=tm2, other=0.0) * (tl.sigmoid(z_pre) * tl.sigmoid(-z_pre))
    dz_pre = tl.where(tm2, dz_pre, 0.0)

    m_post = tl.load(row + N + offs_n[None, :], mask=tm2, other=0.0)
    z_post = m_post * s_post + tl.load(base_ptr + N + offs_n)[None, :]
    dz_post = tl.load(gpost_ptr + tn, mask=tm2, other=0.0) * (post_mult * (tl.sigmoid(z_post) * tl.sigmoid(-z_post)))
    dz_post = tl.where(tm2, dz_post, 0.0)

    m_comb = tl.load(row[:, :, None] + 2 * N + nn, mask=tm3, other=0.0)
    z_comb = m_comb * s_comb + tl.load(base_ptr + 2 * N + nn)
    G = tl.load(gcomb_ptr + offs_t[:, None, None] * (N * N) + nn, mask=tm3, other=0.0)
    dz_comb = tl.where(tm3, _sinkhorn_bwd_tile(G, z_comb, iters, sinkhorn_eps), 0.0)

    tl.store(drow + offs_n[None, :], dz_pre * s_pre, mask=tm2)
    tl.store(drow + N + offs_n[None, :], dz_post * s_post, mask=tm2)
    tl.store(drow[:, :, None] + 2 * N + nn, dz_comb * s_comb, mask=tm3)

    # per-program partials of the token reductions
    tl.store(part_base_ptr + pid * M + offs_n, tl.sum(dz_pre, axis=0))
    tl.store(part_base_ptr + pid * M + N + offs_n, tl.sum(dz_post, axis=0))
    tl.store(part_base_ptr + pid * M + 2 * N + offs_n[:, None] * N + offs_n[None, :], tl.sum(dz_comb, axis=0))
    tl.store(part_scale_ptr + pid * 3, tl.sum(tl.sum(dz_pre * m_pre, axis=1), axis=0))
    tl.store(part_scale_ptr + pid * 3 + 1, tl.sum(tl.sum(dz_post * m_post, axis=1), axis=0))
    tl.store(part_scale_ptr + pid * 3 + 2, tl.sum(tl.sum(tl.sum(dz_comb * m_comb, axis=2), axis=1), axis=0))


# -- configs ---------------------------------------------------------------------------------------------
_KEYS = ("block_T", "num_warps")


def _is_cpu(call) -> bool:
    dev = getattr(call, "device", None)
    return dev is not None and torch.device(dev).type == "cpu"


def config_space(op: str, call) -> list[dict]:
    """Tunables of every op here (split_mixes[_bwd], sinkhorn[_bwd]): ``block_T`` tokens per program, ``num_warps``."""
    return [dict(block_T=bt, num_warps=nw) for bt in (8, 16, 32, 64, 128) for nw in (1, 2, 4, 8)
            if bt * call.n * call.n >= 32 * nw]   # at least one matrix element per thread


def default_config(op: str, call) -> dict:
    if _is_cpu(call):
        return dict(block_T=64, num_warps=4)
    # the tile is block_T * n * n floats; these are spill-free with ptxas for sm_80/90/100
    backward = op.endswith("_bwd")
    block_T, num_warps = {1: (128, 2), 2: (128, 2), 4: (32, 4) if backward else (64, 4),
                          8: (16, 4) if backward else (32, 8)}.get(call.n, (16, 4))
    return dict(block_T=block_T, num_warps=num_warps)


def _check_config(op: str, cfg: dict) -> dict:
    missing = [k for k in _KEYS if k not in cfg]
    unknown = [k for k in cfg if k not in _KEYS]
    if missing or unknown:
        raise ValueError(f"triton {op}: config {cfg} must have exactly the keys {list(_KEYS)} "
                         f"(missing {missing}, unknown {unknown})")
    bt = cfg["block_T"]
    if not isinstance(bt, int) or bt < 1 or bt & (bt - 1):
        raise ValueError(f"triton {op}: config['block_T'] must be a power of two >= 1; got {bt!r}")
    if cfg["num_warps"] not in (1, 2, 4, 8, 16):
        raise ValueError(f"triton {op}: config['num_warps'] must be 1, 2, 4, 8 or 16; got {cfg['num_warps']!r}")
    return cfg


def supports(call) -> Optional[str]:
    """None when these kernels serve ``call``'s n, else why not (the registry then falls back)."""
    if call.n is not None and call.n not in (1, 2, 4, 8):
        return (f"the Triton Sinkhorn kernels keep the n x n matrix as a power-of-two register tile "
                f"(n in 1, 2, 4, 8); got n={call.n} -- the tilelang or reference backend serves it")
    return None


def _check_n(op: str, n: int):
    if n not in (1, 2, 4, 8):
        raise ValueError(f"triton {op}: n must be 1, 2, 4 or 8 (the n x n tile is a power-of-two register "
                         f"tile); got n={n}")


# -- wrappers ---------------------------------------------------------------------------------------------
def sinkhorn_fwd(logits, iters, eps, *, config: dict):
    """contract §3: logits (T, n, n) fp32 -> comb_mix (T, n, n) fp32.

    Bytes moved (specs.SPECS["sinkhorn"].bytes): 2 * T*n*n*4. One read of the logits.
    """
    T, n, _ = logits.shape
    _check_n("sinkhorn", n)
    out = _alloc((T, n, n), torch.float32, logits.device)
    if T == 0:
        return out
    cfg = _check_config("sinkhorn", config)
    _sinkhorn_fwd_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        logits, out, T, int(iters), float(eps), N=n, BLOCK_T=cfg["block_T"], num_warps=cfg["num_warps"])
    return out


def sinkhorn_bwd(grad, logits, iters, eps, *, config: dict):
    """contract §9: grad, logits (T, n, n) fp32 -> d_logits (T, n, n) fp32 (exact unrolled gradient).

    Bytes moved (specs.SPECS["sinkhorn_bwd"].bytes): 3 * T*n*n*4. Iterations recomputed on chip.
    """
    T, n, _ = logits.shape
    _check_n("sinkhorn_bwd", n)
    out = _alloc((T, n, n), torch.float32, logits.device)
    if T == 0:
        return out
    cfg = _check_config("sinkhorn_bwd", config)
    _sinkhorn_bwd_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        grad, logits, out, T, int(iters), float(eps), N=n, BLOCK_T=cfg["block_T"], num_warps=cfg["num_warps"])
    return out


def split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps, *, config: dict):
    """contract §3: mixes (T, m) fp32, scale (3,), base (m,) -> (pre_mix (T, n), post_mix (T, n),
    comb_mix (T, n, n)), all fp32, in one kernel.

    Bytes moved (specs.SPECS["split_mixes"].bytes): T*m*4 + (3 + m)*4 + T*(2n + n*n)*4.
    """
    T, m = mixes.shape
    n = stream_count(m)
    _check_n("split_mixes", n)
    dev = mixes.device
    pre = _alloc((T, n), torch.float32, dev)
    post = _alloc((T, n), torch.float32, dev)
    comb = _alloc((T, n, n), torch.float32, dev)
    if T == 0:
        return pre, post, comb
    cfg = _check_config("split_mixes", config)
    _split_mixes_fwd_kernel[(triton.cdiv(T, cfg["block_T"]),)](
        mixes, scale, base, pre, post, comb, T, float(pre_eps), float(post_mult), int(iters), float(sinkhorn_eps),
        N=n, BLOCK_T=cfg["block_T"], num_warps=cfg["num_warps"])
    return pre, post, comb


def split_mixes_bwd(grad_pre, grad_post, grad_comb, mixes, scale, base, post_mult, iters, sinkhorn_eps, *,
                    config: dict):
    """contract §9 -> (d_mixes (T, m), d_scale (3,), d_base (m,)), fp32.

    grad_pre, grad_post (T, n), grad_comb (T, n, n), mixes (T, m), all fp32. The Sinkhorn
    iterations are recomputed from the mixes (nothing saved from the forward). d_scale and
    d_base are token sums: one partial per program, then torch.sum over programs.
    Bytes moved (specs.SPECS["split_mixes_bwd"].bytes): T*(2n + n*n + 2m)*4 + (2*3 + 2*m)*4,
    plus programs*(3 + m)*4 for the partials.
    """
    T, m = mixes.shape
    n = stream_count(m)
    _check_n("split_mixes_bwd", n)
    dev = mixes.device
    d_mixes = _alloc((T, m), torch.float32, dev)
    if T == 0:
        return d_mixes, torch.zeros(3, dtype=torch.float32, device=dev), torch.zeros(m, dtype=torch.float32,
                                                                                      device=dev)
    cfg = _check_config("split_mixes_bwd", config)
    programs = triton.cdiv(T, cfg["block_T"])
    part_scale = _alloc((programs, 3), torch.float32, dev)
    part_base = _alloc((programs, m), torch.float32, dev)
    _split_mixes_bwd_kernel[(programs,)](
        grad_pre, grad_post, grad_comb, mixes, scale, base, d_mixes, part_scale, part_base,
        T, float(post_mult), int(iters), float(sinkhorn_eps), N=n, BLOCK_T=cfg["block_T"],
        num_warps=cfg["num_warps"])
    return d_mixes, torch.sum(part_scale, dim=0), torch.sum(part_base, dim=0)


# -- ahead-of-time specs ----------------------------------------------------------------------------------
def aot_specs(n: int, C: int, dtype: torch.dtype, T: int = 4096) -> list[common.AotSpec]:
    """The four kernels at their default GPU configs for a T=4096 call with n streams (C and the
    residual dtype do not enter these kernels: the mixes are fp32)."""
    call = SimpleNamespace(T=T, n=n, C=C, dtype=dtype, device=torch.device("cuda"))
    f, b = default_config("sinkhorn", call), default_config("sinkhorn_bwd", call)
    ce = lambda cfg: dict(N=n, BLOCK_T=cfg["block_T"])  # noqa: E731
    sk = {"T": "i32", "iters": "i32", "eps": "fp32", "N": "constexpr", "BLOCK_T": "constexpr"}
    return [
        common.AotSpec("sinkhorn_fwd", _sinkhorn_fwd_kernel, {"logits_ptr": "*fp32", "out_ptr": "*fp32", **sk},
                       ce(f), num_warps=f["num_warps"], num_stages=1, config=f),
        common.AotSpec("sinkhorn_bwd", _sinkhorn_bwd_kernel,
                       {"grad_ptr": "*fp32", "logits_ptr": "*fp32", "d_ptr": "*fp32", **sk},
                       ce(b), num_warps=b["num_warps"], num_stages=1, config=b),
        common.AotSpec("split_mixes_fwd", _split_mixes_fwd_kernel,
                       {"mixes_ptr": "*fp32", "scale_ptr": "*fp32", "base_ptr": "*fp32", "pre_ptr": "*fp32",
                        "post_ptr": "*fp32", "comb_ptr": "*fp32", "T": "i32", "pre_eps": "fp32",
                        "post_mult": "fp32", "iters": "i32", "sinkhorn_eps": "fp32", "N": "constexpr",
                        "BLOCK_T": "constexpr"},
                       ce(f), num_warps=f["num_warps"], num_stages=1, config=f),
        common.AotSpec("split_mixes_bwd", _split_mixes_bwd_kernel,
                       {"gpre_ptr": "*fp32", "gpost_ptr": "*fp32", "gcomb_ptr": "*fp32", "mixes_ptr": "*fp32",
                        "scale_ptr": "*fp32", "base_ptr": "*fp32", "dmixes_ptr": "*fp32",
                        "part_scale_ptr": "*fp32", "part_base_ptr": "*fp32", "T": "i32", "post_mult": "fp32",
                        "iters": "i32", "sinkhorn_eps": "fp32", "N": "constexpr", "BLOCK_T": "constexpr"},
                       ce(b), num_warps=b["num_warps"], num_stages=1, config=b),
    ]
