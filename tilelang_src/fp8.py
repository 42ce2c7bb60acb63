"""TileLang kernel of ``quantize_fp8``: the e4m3 copy of a layer input with one scale per group along C
(contract §15).

Layout: ``x (T, C)`` (bf16/fp16/fp32) -> ``codes (T, C)`` (the float8_e4m3fn bytes, as uint8) and ``scales
(T, C / group)``: float32 for groups of 128, the E8M0 byte (uint8) for groups of 32 (``specs.fp8_scale_dtype``).
Grid (tokens, group blocks of ``threads``); one thread per (token, group) walks its group twice in
``vec``-element vectors: the amax (and whether every value is finite), then the codes (the second read hits L1).
Every value is read once from DRAM and every code and scale written once.

Exactness, as the Triton kernel: IEEE float32 divisions (TileLang compiles without fast math), the
power-of-two scale (group 32) from the exponent bits with ``x / scale`` an exact multiplication, and the e4m3
rounding (nearest, ties to even, saturated to 448) in integer arithmetic on the float32 bits -- no fp8
conversion instruction, so the CPU emulator runs exactly what the GPU runs. The finite test is on the
exponent bits too: TVM's simplifier folds ``f - f == 0`` and ``f != f`` as if floats had no inf or NaN.

The per-(token, group) body is :func:`quantize_group_macro`, written once: this kernel runs it for every group,
and the boundary tails of ``fused.py`` run it on the layer input they have just stored (the FP8 copy fused into
the kernel that writes the layer input), so both produce the same bits.

Config keys: ``threads``, ``vec`` (a power of two dividing the group, <= 16 bytes).
"""

import torch

from mhc_kernels.specs import fp8_scale_dtype

from .common import KernelDef, Shape, dtype_name, kernel_def, max_vec

KEYS = ("threads", "vec")


def default_config(op: str, s: Shape) -> dict:
    """128 threads (one group each), 16-byte vectors; independent of T (batch invariant)."""
    return {"threads": 128, "vec": max_vec(s.dtype, 32)}


def config_space(op: str, s: Shape) -> list[dict]:
    v = max_vec(s.dtype, 32)
    return [{"threads": th, "vec": vv} for th in (128, 64, 256) for vv in sorted({v, max(1, v // 2)}, reverse=True)]


def scale_dtype_name(group: int) -> str:
    """The TileLang dtype of a scales buffer for ``group`` (``specs.fp8_scale_dtype``; 0: none, float32)."""
    return str(fp8_scale_dtype(group)).removeprefix("torch.")


def quantize_group_macro(group: int, V: int, dt: str):
    """``quantize_group(x, codes, scales, row, g)``: the FP8 copy of group ``g`` of row ``row`` of ``x (., C)``
    (dtype ``dt``), read in ``V``-element vectors (``V`` divides ``group``): ``scales[row, g]`` (float32, or the
    E8M0 byte in a uint8 buffer for group 32) and the ``group`` codes ``codes[row, g * group:(g + 1) * group]``
    (uint8), exactly as the module docstring says.

    Two passes over the group (the second hits L1): the amax of its finite values and whether it holds an inf or
    NaN, then the codes. Shared by ``quantize_fp8`` and the boundary tails (``fused.py``); the caller masks
    ``row`` and ``g`` to the tensor.
    """
    import tilelang.language as T

    if group % V:
        raise ValueError(f"quantize_fp8: vec={V} must divide group={group}")
    NV = group // V
    u32 = T.uint32

    @T.macro
    def quantize_group(x, codes, scales, row, g):
        xv = T.alloc_local((V,), dt)
        cv = T.alloc_local((V,), "uint8")
        amax = T.alloc_var("float32")
        f = T.alloc_var("float32")
        bad = T.alloc_var("int32")
        r = T.alloc_var("float32")
        inv = T.alloc_var("float32")
        e2 = T.alloc_var("uint32")
        code = T.alloc_var("uint32")
        bits = T.alloc_var("uint32")
        M = T.alloc_var("uint32")
        keep = T.alloc_var("uint32")
        rem = T.alloc_var("uint32")
        mant = T.alloc_var("uint32")
        sh = T.alloc_var("uint32")
        qi = T.alloc_var("uint32")
        r2 = T.alloc_var("uint32")
        half = T.alloc_var("uint32")
        E = T.alloc_var("int32")
        # -- a = max(amax |x|, 1e-4) over the group's finite values; bad: an inf or NaN in it ----------
        amax = 0.0
        bad = 0
        for j in T.serial(NV):
            for v in T.vectorized(V):
                xv[v] = x[row, g * group + j * V + v]
            for v in T.serial(V):
                f = T.cast(xv[v], "float32")
                if (T.reinterpret(f, "uint32") & u32(0x7F800000)) != u32(0x7F800000):   # finite
                    amax = T.max(amax, T.abs(f))
                else:
                    bad = 1
        # -- r = a / 448; scale = r (group 128) or 2^(e2 - 127) = 2^ceil(log2 r) (group 32), inv = 1 / scale -
        r = T.max(amax, T.float32(1e-4)) / T.float32(448.0)
        if group == 32:
            e2 = (T.reinterpret(r, "uint32") >> u32(23)) + T.if_then_else(
                (T.reinterpret(r, "uint32") & u32(0x7FFFFF)) != u32(0), u32(1), u32(0))
            inv = T.reinterpret((u32(254) - e2) << u32(23), "float32")
        if group == 32:   # the E8M0 byte: the biased exponent e2, 0xFF (NaN) for a bad group
            scales[row, g] = T.cast(T.if_then_else(bad != 0, u32(0xFF), e2), "uint8")
        else:
            if bad != 0:
                r = T.reinterpret(u32(0x7FC00000), "float32")
            scales[row, g] = r
        # -- codes = e4m3(x / scale), NaN for a bad group ------------------------------------------------
        for j in T.serial(NV):
            for v in T.vectorized(V):
                xv[v] = x[row, g * group + j * V + v]
            for v in T.serial(V):
                if group == 32:
                    f = T.cast(xv[v], "float32") * inv
                else:
                    f = T.cast(xv[v], "float32") / r
                # code = the e4m3fn byte nearest to f (ties to even, |f| saturated to 448); NaN -> 0x7F
                bits = T.reinterpret(T.min(T.abs(f), T.float32(448.0)), "uint32")
                E = T.cast((bits >> u32(23)) & u32(0xFF), "int32")
                M = bits & u32(0x7FFFFF)
                if E >= 121:      # normal: the top 3 mantissa bits, rounded on the 20 dropped
                    keep = M >> u32(20)
                    rem = M & u32(0xFFFFF)
                    code = (T.cast(E - 120, "uint32") << u32(3)) | keep
                    if rem > u32(0x80000) or (rem == u32(0x80000) and (keep & u32(1)) == u32(1)):
                        code = code + u32(1)   # a carry moves into the exponent
                elif E >= 117:    # subnormal: units of 2^-9 from the 24-bit significand
                    mant = M | u32(0x800000)
                    sh = T.cast(141 - E, "uint32")
                    qi = mant >> sh
                    r2 = mant & ((u32(1) << sh) - u32(1))
                    half = u32(1) << (sh - u32(1))
                    code = qi
                    if r2 > half or (r2 == half and (qi & u32(1)) == u32(1)):
                        code = code + u32(1)
                else:
                    code = u32(0)
                code = code | ((T.reinterpret(f, "uint32") >> u32(31)) << u32(7))
                if bad != 0:      # a group with an inf or NaN: NaN codes
                    code = u32(0x7F)
                cv[v] = T.cast(code, "uint8")
            for v in T.vectorized(V):
                codes[row, g * group + j * V + v] = cv[v]

    return quantize_group


def _build_quantize_fp8(n, C, dtype, cfg, group=128):
    import tilelang.language as T

    dt = dtype_name(dtype)
    th, V = cfg["threads"], cfg["vec"]
    if group % V or C % group:
        raise ValueError(f"quantize_fp8: vec={V} must divide group={group}, and group must divide C={C}")
    G = C // group
    Tn = T.dynamic("T")
    quantize_group = quantize_group_macro(group, V, dt)

    @T.prim_func
    def quantize_fp8(x: T.Tensor((Tn, C), dt),                                            # input
                     codes: T.Tensor((Tn, C), "uint8"), scales: T.Tensor((Tn, G), scale_dtype_name(group))):
        with T.Kernel(Tn, T.ceildiv(G, th), threads=th) as (by, bx):
            tx = T.get_thread_binding(0)
            g = bx * th + tx
            if g < G:
                # scales[by, g] and the group's codes
                quantize_group(x, codes, scales, by, g)

    return quantize_fp8


kernel_def(KernelDef("quantize_fp8", "quantize_fp8", _build_quantize_fp8, KEYS,
                     lambda s: {"group": 128 if s.C % 128 == 0 else 32}))


def quantize_fp8_fwd(x, group, *, config):
    """-> (codes (T, C) float8_e4m3fn, scales (T, C / group): float32, or E8M0 bytes for group 32); see the
    module docstring."""
    from .common import get_kernel

    Tt, C = x.shape
    codes = torch.empty((Tt, C), dtype=torch.uint8, device=x.device)
    scales = torch.empty((Tt, C // group), dtype=fp8_scale_dtype(group), device=x.device)
    if Tt and C // group:
        cfg = dict(config, vec=min(config["vec"], group))
        get_kernel("quantize_fp8", 1, C, x.dtype, cfg, x.device, group=int(group))(x, codes, scales)
    return codes.view(torch.float8_e4m3fn), scales
