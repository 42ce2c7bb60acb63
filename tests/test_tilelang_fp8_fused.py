"""The FP8 copy of the layer input written by the TileLang boundary tails (``fused.py``, ``fp8_group`` > 0),
run through the CPU emulator.

The four forward wrappers are called directly (``mhc_pre_fwd``, ``post_pre_fwd``, ``mhc_pre_sp_fwd``,
``post_pre_sp_fwd``) in every mode -- with and without the sublayer's norm, the single-pass first site and a
middle one, post_pre's tensor-core path (post, then mhc_pre) -- and the codes and scales are compared bit for
bit with ``torch_ref.quantize_fp8_fwd`` (and the ``quantize_fp8`` kernel) applied to the layer input the same
call returns; every other output must be the ``fp8_group=0`` call's, bit for bit. The layer inputs include a
zero token row, an all-zero group and an inf (a NaN-scale group with 0x7F codes). Shapes reuse one config per
(n, C) for every T, so each kernel is built once per module.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'mhc-kernels[tilelang]')")
if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no host C++ compiler (g++) to build the emulated kernels", allow_module_level=True)

from mhc_kernels.reference import cases, torch_ref  # noqa: E402
from mhc_kernels.tilelang_src import EMULATE_ENV  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _emulate():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EMULATE_ENV, "1")
        yield


DT = torch.bfloat16
CONSTS = ("norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps", "out_norm_eps")
# (n, C, FP8 groups); C = 96 is not a power of two (the tails' column tiles are ragged)
SHAPES = {"n4-C256": (4, 256, (128, 32)), "n1-C96": (1, 96, (32,))}
TOKENS = (1, 5, 37)   # 37: several token blocks of every tail, none of them full
# (op, with the sublayer's norm, the single-pass first site, tensor-core post_pre path)
MODES = {
    "mhc_pre": ("mhc_pre", False, False, False), "mhc_pre-norm": ("mhc_pre", True, False, False),
    "post_pre": ("post_pre", False, False, False), "post_pre-norm": ("post_pre", True, False, False),
    "post_pre-mma-norm": ("post_pre", True, False, True),
    "mhc_pre_sp-first": ("mhc_pre_sp", False, True, False), "mhc_pre_sp-mid-norm": ("mhc_pre_sp", True, False, False),
    "mhc_pre_sp-first-norm": ("mhc_pre_sp", True, True, False), "mhc_pre_sp-mid": ("mhc_pre_sp", False, False, False),
    "post_pre_sp-first": ("post_pre_sp", False, True, False),
    "post_pre_sp-mid-norm": ("post_pre_sp", True, False, False),
}
# n=1, C=96 runs the modes that build every FP8 tail (the four kernels) once; n=4, C=256 all of them
SHAPE_MODES = {"n4-C256": tuple(MODES), "n1-C96": ("mhc_pre", "mhc_pre-norm", "mhc_pre_sp-mid-norm",
                                                   "post_pre_sp-first")}
CASES = [(s, m, T) for s in SHAPES for m in SHAPE_MODES[s] for T in TOKENS]


def _inputs(n, C, T):
    """One input set (post_pre_sp's: it has every argument) with, from T = 5 on, token 1 all zero (layer output
    too), token 2's first 32 columns zero in every stream (an all-zero group of 32) and an inf in token 3's
    stream 0 at column 40 (the first site's layer input takes stream 0, the carried pre's collapse keeps it an
    inf there, the projection makes the other boundaries' whole token NaN)."""
    d = cases.make_inputs("post_pre_sp", (T,), n, C, DT, "cpu", norm_weight=True)
    if T >= 5:
        for k in ("residual", "layer_output"):
            d[k] = d[k].clone()
            d[k][1] = 0
            d[k][2, ..., :32] = 0
        d["residual"][3, 0, 40] = float("inf")
    return d


# n=1, C=96: tails of 64 tokens, so a CTA has more (token, group) items than threads (two quantising passes, the
# second one partly masked) and rows past T; n=4, C=256 keeps the defaults (several token blocks at T = 37)
TAIL_LAYOUTS = {"n1-C96": {"tail": {"block_T": 64, "block_C": 128, "threads": 128, "vec": 8},
                           "collapse_norm": {"block_T": 64, "threads": 128, "vec": 8}}}


@pytest.fixture(scope="module")
def configs():
    """One config per (op, n, C), for every T (so each kernel is built once)."""
    from mhc_kernels.tilelang_src import common, fused

    out = {}
    for s, (n, C, _) in SHAPES.items():
        for op in ("mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp"):
            cfg = fused.default_config(op, common.Shape(37, n, C, DT))
            out[(op, s)] = dict(cfg, **{k: v for k, v in TAIL_LAYOUTS.get(s, {}).items() if k in cfg})
    return out


def _call(op, d, norm, first, fp8_group, config):
    """-> (the outputs before the FP8 pair, the layer input, fp8_codes, fp8_scales) of the ``op`` wrapper."""
    from mhc_kernels.tilelang_src import fused

    w = d["out_norm_weight"] if norm else None
    prev = None if first else d["prev_pre"]
    site = (d["fn"], d["scale"], d["base"], d["norm_weight"], w, *(d[k] for k in CONSTS), fp8_group)
    post = (d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    if op == "mhc_pre":
        out = fused.mhc_pre_fwd(d["residual"], *site, config=config)
    elif op == "post_pre":
        out = fused.post_pre_fwd(*post, *site, config=config)
    elif op == "mhc_pre_sp":
        out = fused.mhc_pre_sp_fwd(d["residual"], prev, *site, config=config)
    else:
        out = fused.post_pre_sp_fwd(*post, prev, *site, config=config)
    li = out[1] if op.startswith("post_") else out[0]
    return out[:-2], li, out[-2], out[-1]


def _bits(t):
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(_bits(a), _bits(b)), f"{what} differs"


@pytest.fixture
def fma_projection(monkeypatch):
    """post_pre's tensor-core path (post, then mhc_pre) with its projection run as "fma" (the emulator cannot
    run MMA): the wiring of the FP8 copy through that path is what is checked."""
    from mhc_kernels.tilelang_src import norm

    real = norm.norm_fn_partials
    monkeypatch.setattr(norm, "norm_fn_partials",
                        lambda r, f, w, *, config: real(r, f, w, config=dict(config, mma="fma")))


@pytest.mark.parametrize("shape,mode,T", CASES, ids=lambda c: str(c))
def test_fused_fp8_copy_is_quantize_fp8_of_the_layer_input(shape, mode, T, configs, request):
    from mhc_kernels.tilelang_src import common, fp8

    n, C, groups = SHAPES[shape]
    op, norm, first, mma = MODES[mode]
    cfg = configs[(op, shape)]
    if mma:
        request.getfixturevalue("fma_projection")
        cfg = dict(cfg, projection=dict(cfg["projection"], mma="3xtf32"))
    d = _inputs(n, C, T)
    plain, li0, codes0, scales0 = _call(op, d, norm, first, 0, cfg)
    assert codes0.shape == (T, 0) and codes0.dtype == torch.uint8     # the float8_e4m3fn bytes
    assert scales0.shape == (T, 0) and scales0.dtype == torch.float32
    if T >= 5:
        assert bool((li0[1] == 0).all()) and bool((li0[2, :32] == 0).all()), "the zero token / group"
        assert not bool(li0[3].isfinite().all()), "the inf reaches the layer input"
    for g in groups:
        outs, li, codes, scales = _call(op, d, norm, first, g, cfg)
        for i, (a, b) in enumerate(zip(outs, plain)):
            _assert_same_bits(a, b, f"{mode} fp8_group={g}: output {i} vs the fp8_group=0 call")
        assert codes.shape == (T, C) and codes.dtype == torch.uint8
        # float32 scales at 128; at 32 the E8M0 bytes (the biased exponent, 0xFF for NaN)
        assert scales.shape == (T, C // g) and scales.dtype == (torch.float32 if g == 128 else torch.uint8)
        want_codes, want_scales = torch_ref.quantize_fp8_fwd(li, g)
        _assert_same_bits(codes.view(torch.uint8), want_codes.view(torch.uint8), f"{mode} g={g} codes")
        torch.testing.assert_close(scales, want_scales, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{mode} g={g} scales: {m}")
        if T >= 5:
            bad = 40 // g
            nan_scale = scales[3, bad].isnan() if g == 128 else scales[3, bad] == 0xFF
            assert bool(nan_scale) and bool((codes[3, bad * g:(bad + 1) * g].view(torch.uint8)
                                             == 0x7F).all()), "the inf's group: NaN scale, NaN codes"
            assert bool((scales[1] == torch.tensor(1e-4, dtype=torch.float32) / 448).all() if g == 128 else
                        (scales[1] == 127 - 22).all()), "a zero group's scale is max(0, 1e-4) / 448 (2^-22 at 32)"
            assert bool((codes[1].view(torch.uint8) == 0).all())
        if T == 37 and mode in ("mhc_pre", "mhc_pre_sp-first"):
            # ... and the quantize_fp8 kernel's bits (the same macro)
            qcfg = fp8.default_config("quantize_fp8", common.Shape(T, 1, C, DT))
            kc, ks = fp8.quantize_fp8_fwd(li, g, config=qcfg)
            _assert_same_bits(codes.view(torch.uint8), kc.view(torch.uint8), f"{mode} g={g} codes vs the kernel")
            _assert_same_bits(scales, ks, f"{mode} g={g} scales vs the kernel")


def test_no_tokens_no_launch(monkeypatch, configs):
    from mhc_kernels.tilelang_src import common

    def refuse(*args, **kwargs):
        raise AssertionError("T = 0 must not build or launch a kernel")

    monkeypatch.setattr(common, "_compiled", refuse)
    d = _inputs(4, 256, 0)
    for op in ("mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp"):
        for g in (0, 128, 32):
            _, li, codes, scales = _call(op, d, True, False, g, configs[(op, "n4-C256")])
            assert li.shape == (0, 256) and codes.shape == (0, 256 if g else 0)
            assert scales.shape == (0, 256 // g if g else 0)
            assert codes.dtype == torch.uint8 and scales.dtype == (torch.uint8 if g == 32 else torch.float32)


def test_no_fp8_keeps_the_kernel_keys_and_fp8_adds_one_constant_to_the_tail(configs):
    """With fp8_group=0 the launched kernels' keys carry no FP8 constant (the plain kernels, as before); with a
    group only the tail's key changes, by ``fp8_group`` (what runtime_keys records and --fill-cache builds)."""
    from mhc_kernels.tilelang_src import runtime_keys

    d = _inputs(4, 256, 300)
    for op, tail in (("mhc_pre", "mhc_pre_tail"), ("post_pre", "mhc_pre_tail"), ("mhc_pre_sp", "mhc_pre_sp_tail"),
                     ("post_pre_sp", "mhc_pre_sp_tail")):
        for norm in (False, True):
            t = "mhc_pre_norm_tail" if norm and tail == "mhc_pre_tail" else tail
            keys = {}
            for g in (0, 128, 32):
                with runtime_keys.recording() as rec:
                    _call(op, d, norm, False, g, configs[(op, "n4-C256")])
                keys[g] = rec
            assert all("fp8_group" not in dict(k.consts) for k in keys[0]), (op, keys[0])
            for g in (128, 32):
                assert [k.kernel for k in keys[g]] == [k.kernel for k in keys[0]], (op, g)
                for a, b in zip(keys[g], keys[0]):
                    if a.kernel == t:
                        assert dict(a.consts) == dict(b.consts, fp8_group=g) and a.config == b.config, (op, g)
                    else:
                        assert a == b, (op, g)


def test_fp8_needs_whole_groups_per_column_tile():
    from mhc_kernels.tilelang_src import fused

    cfg = {"block_T": 8, "block_C": 64, "threads": 64, "vec": 8, "split_K": 1}
    for build in (fused._build_pre_tail, fused._build_pre_sp_tail):
        with pytest.raises(ValueError, match=r"block_C.*multiple of fp8_group=128"):
            build(4, 256, DT, cfg, fp8_group=128)
    with pytest.raises(ValueError, match="must divide C"):
        fused._build_pre_norm_tail(4, 96, DT, {"block_T": 4, "threads": 128, "vec": 8, "split_K": 1}, fp8_group=128)
    with pytest.raises(ValueError, match="fp8_group must be 0"):
        fused.fp8_outputs(3, 256, 64, "cpu")


@pytest.mark.parametrize("C", [32, 96, 256, 4096, 7168, 1280])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_default_and_space_configs_take_every_fp8_group(C, dtype):
    """Every default and space config of the boundary ops has whole groups of every FP8 group dividing C in its
    tail's column tile (its block_C is a power of two >= min(next_pow2(C), 256))."""
    from mhc_kernels.specs import FP8_GROUPS
    from mhc_kernels.tilelang_src import common, fused

    for T in (1, 4096):
        s = common.Shape(T, 4, C, dtype)
        for op in ("mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp"):
            for cfg in fused.config_space(op, s):
                for g in FP8_GROUPS:
                    if C % g == 0:
                        assert cfg["tail"]["block_C"] % g == 0, (op, C, cfg)
