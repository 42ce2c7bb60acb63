"""Triton kernel of ``quantize_fp8``: the e4m3 copy of a layer input with one scale per group along C
(contract §15).

Layout: ``x (T, C)`` (bf16/fp16/fp32) -> ``codes (T, C)`` float8_e4m3fn (written as their bytes) and
``scales (T, C / group)``: float32 for groups of 128, the E8M0 byte (uint8) for groups of 32. A program owns
``block_T`` tokens x ``block_G`` groups, loads its ``(block_T, block_G, group)`` tile once, reduces each group's
amax in registers, and writes the codes and scales once: ``C * (elem + 1)`` bytes plus ``4 * C / 128`` or
``C / 32`` per token.

Exactness (the codes must equal the oracle's bit for bit): the float32 divisions are ``div_rn`` (IEEE
round-to-nearest, not the approximate ``/``); the power-of-two scale (group 32) is built from the exponent
bits (which are its E8M0 byte), and ``x / scale`` is then an exact multiplication by ``2^-k``; the e4m3
rounding (nearest, ties to even, saturated to 448) is done in integer arithmetic on the float32 bits, so it does
not depend on the hardware's conversion instruction or the interpreter's.

Config: ``block_T``, ``block_G`` (powers of two), ``num_warps``; the default does not depend on T (batch
invariant).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mhc_kernels.specs import fp8_scale_dtype

from . import common


def scale_ptr(group: int) -> str:
    """The AOT signature of a scales pointer for ``group`` (``specs.fp8_scale_dtype``; 0: none)."""
    return {torch.uint8: "*u8", torch.float32: "*fp32"}[fp8_scale_dtype(group)]


@triton.jit
def e4m3_bits(q):
    """float32 ``q`` (finite, or NaN) -> the float8_e4m3fn byte of the nearest value (ties to even, |q| saturated
    to 448), as uint32. Normal range (|q| >= 2^-6): the top 3 mantissa bits, rounded on the 20 dropped ones (a
    carry moves into the exponent); below: units of 2^-9 from the 24-bit significand. NaN -> 0x7F."""
    a = tl.minimum(tl.abs(q), 448.0)
    bits = a.to(tl.uint32, bitcast=True)
    E = ((bits >> 23) & 0xFF).to(tl.int32)
    M = bits & 0x7FFFFF
    keep = M >> 20
    rem = M & 0xFFFFF
    up = (rem > 0x80000) | ((rem == 0x80000) & ((keep & 1) == 1))
    normal = ((E - 120).to(tl.uint32) << 3 | keep) + up.to(tl.uint32)
    mant = M | 0x800000
    sh = tl.minimum(tl.maximum(141 - E, 1), 31).to(tl.uint32)
    qi = mant >> sh
    r2 = mant & (((tl.zeros_like(mant) + 1) << sh) - 1)
    half = (tl.zeros_like(mant) + 1) << (sh - 1)
    sub = qi + ((r2 > half) | ((r2 == half) & ((qi & 1) == 1))).to(tl.uint32)
    code = tl.where(E >= 121, normal, tl.where(E >= 117, sub, tl.zeros_like(sub)))
    code = code | ((q.to(tl.uint32, bitcast=True) >> 31) << 7)
    return tl.where(q != q, tl.zeros_like(code) + 0x7F, code)


@triton.jit
def quantize_groups(v, POW2: tl.constexpr):
    """``v (rows, G_blocks, GROUP)`` float32 (the stored values, widened) -> (codes uint32 bytes like ``v``,
    scales ``(rows, G_blocks)`` as stored), per group: a = max(amax |x|, 1e-4) over its finite values, r = a / 448
    (div_rn); scale = r (group 128, float32) or 2^ceil(log2 r) (``POW2``, group 32, stored as its E8M0 byte: the
    biased exponent, uint8); codes = e4m3(x / scale); a group with an inf or NaN gets scale NaN (E8M0 0xFF) and
    codes NaN. The quantisation of this kernel and of the boundary tails that write the FP8 copy beside the layer
    input (``single_pass``), written once."""
    finite = tl.abs(v) < float("inf")                      # False for inf and NaN
    bad = tl.max(tl.where(finite, 0, 1), axis=2) > 0
    a = tl.maximum(tl.max(tl.where(finite, tl.abs(v), 0.0), axis=2), 1e-4)
    r = tl.math.div_rn(a, tl.zeros_like(a) + 448.0)
    if POW2:
        rb = r.to(tl.uint32, bitcast=True)
        e2 = (rb >> 23) + ((rb & 0x7FFFFF) != 0).to(tl.uint32)   # the exponent of 2^ceil(log2 r)
        inv = ((254 - e2) << 23).to(tl.float32, bitcast=True)  # 1 / 2^(e2 - 127), exact
        q = v * inv[:, :, None]
    else:
        scale = r
        q = tl.math.div_rn(v, tl.broadcast_to(scale[:, :, None], v.shape))
    q = tl.where(bad[:, :, None], float("nan"), q)
    if POW2:
        stored = tl.where(bad, 0xFF, e2).to(tl.uint8)
    else:
        stored = tl.where(bad, float("nan"), scale)
    return e4m3_bits(q), stored


@triton.jit
def quantize_fp8_kernel(x_ptr, codes_ptr, scales_ptr, T, C, G,
                        GROUP: tl.constexpr, POW2: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Grid (cdiv(T, BLOCK_T), cdiv(G, BLOCK_G)): the ``(BLOCK_T, BLOCK_G, GROUP)`` tile loaded once and
    quantised by :func:`quantize_groups`."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    e = tl.arange(0, GROUP)
    t64 = t.to(tl.int64)
    ok = (t < T)[:, None] & (g < G)[None, :]
    offs = t64[:, None, None] * C + (g[None, :, None] * GROUP + e[None, None, :])
    v = tl.load(x_ptr + offs, mask=ok[:, :, None], other=0.0).to(tl.float32)
    codes, scale = quantize_groups(v, POW2)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=ok[:, :, None])
    tl.store(scales_ptr + t64[:, None] * G + g[None, :], scale, mask=ok)


def _defaults(group: int) -> dict:
    return {"block_T": 4, "block_G": max(1, 512 // group), "num_warps": 4}


def default_config(op: str, call) -> dict:
    """``quantize_fp8``: 4 tokens x 512 columns per program (independent of T)."""
    return _defaults(128 if (call.C or 1) % 128 == 0 else 32)


def config_space(op: str, call) -> list[dict]:
    group = 128 if (call.C or 1) % 128 == 0 else 32
    out = [_defaults(group)]
    for bt in (1, 2, 4, 8):
        for cols in (256, 512, 1024):
            for w in (2, 4, 8):
                c = {"block_T": bt, "block_G": max(1, cols // group), "num_warps": w}
                if c not in out:
                    out.append(c)
    return out


def quantize_fp8_fwd(x: torch.Tensor, group: int, *, config: dict):
    """-> (codes (T, C) float8_e4m3fn, scales (T, C / group): float32, or E8M0 bytes for group 32); see the module
    docstring."""
    T, C = x.shape
    G = C // group
    codes = torch.empty((T, C), dtype=torch.uint8, device=x.device)
    scales = torch.empty((T, G), dtype=fp8_scale_dtype(group), device=x.device)
    if T and G:
        bt, bg = config["block_T"], config["block_G"]
        quantize_fp8_kernel[(triton.cdiv(T, bt), triton.cdiv(G, bg))](
            x, codes, scales, T, C, G, GROUP=group, POW2=group == 32, BLOCK_T=bt, BLOCK_G=bg,
            num_warps=config["num_warps"])
    return codes.view(torch.float8_e4m3fn), scales


def aot_specs(n: int, C: int, dtype: torch.dtype) -> list[common.AotSpec]:
    """The kernel at its default config for both groups (where they divide C; ``n`` does not matter)."""
    ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
    out = []
    for group in (128, 32):
        if C % group:
            continue
        cfg = _defaults(group)
        const = {"GROUP": group, "POW2": group == 32, "BLOCK_T": cfg["block_T"], "BLOCK_G": cfg["block_G"]}
        sig = {"x_ptr": ptr, "codes_ptr": "*u8", "scales_ptr": scale_ptr(group), "T": "i32", "C": "i32:16", "G": "i32"}
        sig.update({k: "constexpr" for k in const})
        out.append(common.AotSpec(name=f"quantize_fp8_g{group}", fn=quantize_fp8_kernel, signature=sig,
                                  constexprs=const, num_warps=cfg["num_warps"], num_stages=1, config=cfg))
    return out
