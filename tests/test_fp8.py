"""The FP8 copy of the layer input (contract §15): ``mk.quantize_fp8`` and ``out_fp8=`` on the boundary ops.

Codes and scales are compared with the NumPy oracle (``reference/oracle.py``) *exactly*, on every backend that
runs on CPU (the reference, Triton under its interpreter, TileLang under the emulator): the groups' amax and
scale choice, round-to-nearest-even onto the e4m3 grid (ties included), saturation at 448, the subnormals,
all-zero groups, and groups holding an inf or a NaN (NaN scale and NaN codes for that group only).
"""

import numpy as np
import pytest
import torch
from backends import BACKENDS

import mhc_kernels as mk
from mhc_kernels.reference import cases, oracle
from mhc_kernels.specs import SPECS

FORMATS = {"e4m3_g128": 128, "e4m3_g32": 32}


def _awkward_input(T, C, group, dtype, seed=0):
    """Rows over 14 decades of magnitude, then the edge groups: all zero, e4m3 ties of the grid (amax 448 so the
    scale is 1 at group 128), subnormal e4m3 values, values past 448 after scaling, and an inf, a -inf and a NaN
    each in its own group."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, C, generator=gen, dtype=torch.float64)
    span = 4 if dtype == torch.float16 else 7
    x *= torch.logspace(-span, span, T, dtype=torch.float64)[:, None]
    ties = torch.tensor([448.0] + [(8 + k % 8 + 0.5) * 2.0 ** (k % 6 - 3) for k in range(1, group)],
                        dtype=torch.float64)
    sub = torch.tensor([448.0] + [(k % 16) * 2.0 ** -13 for k in range(1, group)], dtype=torch.float64)
    x[0, :group] = 0.0
    x[1, :group] = ties
    x[2, :group] = sub
    x[3, group:2 * group] = -ties
    x = x.to(dtype)
    x[4, 3] = float("inf")
    x[5, group + 1] = -float("inf")
    x[6, 2 * group - 1] = float("nan")
    return x


def _assert_exact(codes, scales, x, group):
    want_codes, want_scales = oracle.quantize_fp8(x, group)
    got_codes, got_scales = codes.double().cpu().numpy(), scales.double().cpu().numpy()
    for what, got, want in (("codes", got_codes, want_codes), ("scales", got_scales, want_scales)):
        bad = ~((got == want) | (np.isnan(got) & np.isnan(want)))
        if bad.any():
            at = tuple(np.argwhere(bad)[0])
            pytest.fail(f"{what}: {int(bad.sum())} differ from the oracle, first at {at}: got {got[at]!r}, "
                        f"want {want[at]!r} (x = {float(x[at[0], at[1] if what == 'codes' else at[1] * group])!r})")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_codes_and_scales_equal_the_oracle_exactly(backend, fmt, dtype, served):
    group = FORMATS[fmt]
    x = _awkward_input(9, 3 * group, group, dtype)
    with mk.use_backend(backend):
        codes, scales = mk.quantize_fp8(x, fmt)
    assert codes.dtype == torch.float8_e4m3fn and codes.shape == x.shape
    assert scales.shape == (9, 3) and scales.dtype == (torch.float32 if group == 128 else torch.float8_e8m0fnu)
    _assert_exact(codes, scales, x, group)
    # the propagation is per group: only the groups holding inf / NaN are NaN
    nan_groups = torch.isnan(scales.float())
    assert nan_groups.sum() == 3 and nan_groups[4, 0] and nan_groups[5, 1] and nan_groups[6, 1]
    assert torch.isnan(codes.float()).sum() == 3 * group
    assert served["quantize_fp8"] == {backend}, served


def test_e8m0_scales_on_a_torch_without_float8_e8m0fnu_decode_to_float32(monkeypatch):
    """torch < 2.7 has no float8_e8m0fnu: the public functions then decode the stored E8M0 bytes to float32 (NaN for
    0xFF), still the oracle's values."""
    x = _awkward_input(9, 96, 32, torch.bfloat16)
    with mk.use_backend("reference"):
        _, want = mk.quantize_fp8(x, "e4m3_g32")
        monkeypatch.delattr(torch, "float8_e8m0fnu")
        codes, scales = mk.quantize_fp8(x, "e4m3_g32")
    assert scales.dtype == torch.float32 and torch.isnan(scales).sum() == 3
    _assert_exact(codes, scales, x, 32)
    torch.testing.assert_close(scales, want.float(), rtol=0, atol=0, equal_nan=True)


def test_the_oracle_itself_on_hand_values():
    """Anchors: an all-zero group gets the floor scale 1e-4 / 448 (g128) or its power of two 2^-22 (g32) and
    zero codes; ties round to even; 448 * (1 + 2^-4) saturates; a NaN group is NaN."""
    x = np.zeros((1, 128))
    codes, scales = oracle.quantize_fp8(x, 128)
    assert scales[0, 0] == np.float32(np.float32(1e-4) / np.float32(448)) and not codes.any()
    _, s32 = oracle.quantize_fp8(np.zeros((1, 32)), 32)
    assert s32[0, 0] == 2.0 ** -22            # 1e-4 / 448 = 2.23e-7, rounded up to a power of two
    # [8, 16) has step 1, [16, 32) step 2; below 2^-6 the step is 2^-9
    np.testing.assert_array_equal(
        oracle.e4m3_round([9.0, 9.5, 10.5, 17.0, 19.0, 476.0, -1000.0, 2 ** -10, 3 * 2 ** -10, 5 * 2 ** -11]),
        [9.0, 10.0, 10.0, 16.0, 20.0, 448.0, -448.0, 0.0, 2 ** -8, 2 ** -9])
    c, s = oracle.quantize_fp8(np.r_[np.nan, np.ones(31)][None], 32)
    assert np.isnan(s).all() and np.isnan(c).all()


@pytest.mark.parametrize("op", ["mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_out_fp8_is_the_copy_of_the_returned_layer_input(op, backend):
    """``out_fp8=`` appends ``(codes, scales)`` of the layer input the op returns (after the sublayer norm)."""
    d = cases.make_inputs(op, (5,), 4, 256, torch.bfloat16, norm_weight=True, seed=2)
    case = cases.CASES[op]
    li_at = 1 if op.startswith("post") else 0
    with torch.no_grad(), mk.use_backend(backend):
        plain = case.run(mk, d)
        for fmt, group in FORMATS.items():
            run = {"mhc_pre": lambda: mk.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"],
                                                 norm_weight=d["norm_weight"], out_norm_weight=d["out_norm_weight"],
                                                 out_fp8=fmt),
                   "post_pre": lambda: mk.post_pre(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"],
                                                   d["fn"], d["scale"], d["base"], norm_weight=d["norm_weight"],
                                                   out_norm_weight=d["out_norm_weight"], out_fp8=fmt),
                   "mhc_pre_sp": lambda: mk.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"],
                                                       norm_weight=d["norm_weight"],
                                                       out_norm_weight=d["out_norm_weight"], out_fp8=fmt),
                   "post_pre_sp": lambda: mk.post_pre_sp(d["layer_output"], d["residual"], d["post_mix"],
                                                         d["comb_mix"], d["prev_pre"], d["fn"], d["scale"], d["base"],
                                                         norm_weight=d["norm_weight"],
                                                         out_norm_weight=d["out_norm_weight"], out_fp8=fmt)}[op]
            out = run()
            assert len(out) == len(plain) + 2
            for a, b in zip(out[:len(plain)], plain):
                assert torch.equal(a, b)
            codes, scales = out[-2:]
            _assert_exact(codes, scales, out[li_at], group)


def _boundary_call(op, d, **kw):
    """``op`` on the inputs ``d`` (``cases.make_inputs``) through the public function."""
    site = dict(norm_weight=d.get("norm_weight"), out_norm_weight=d.get("out_norm_weight"), **kw)
    x, fn, scale, base = d["residual"], d["fn"], d["scale"], d["base"]
    if op == "mhc_pre":
        return mk.mhc_pre(x, fn, scale, base, **site)
    if op == "mhc_pre_sp":
        return mk.mhc_pre_sp(x, d.get("prev_pre"), fn, scale, base, **site)
    y, post, comb = d["layer_output"], d["post_mix"], d["comb_mix"]
    if op == "post_pre":
        return mk.post_pre(y, x, post, comb, fn, scale, base, **site)
    return mk.post_pre_sp(y, x, post, comb, d.get("prev_pre"), fn, scale, base, **site)


@pytest.mark.parametrize("site", ["plain", "out_norm", "first_site"])
@pytest.mark.parametrize("op", ["mhc_pre", "post_pre", "mhc_pre_sp", "post_pre_sp"])
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_the_fused_fp8_copy_in_every_boundary_mode(op, backend, site):
    """The FP8 copy written beside the layer input (Triton, TileLang: by the kernel that writes it) equals the
    oracle's quantisation of the layer input the call returns, in every mode of the boundary: with and without
    the sublayer's norm, a first single-pass site (the layer input is stream 0, bit for bit), C = 96 (groups of
    32 only) and 256; token 0 has an all-zero group, token 1 an inf (NaN or inf layer input: NaN groups), T = 7
    is no multiple of any block. The other outputs are the call's without ``out_fp8``, bit for bit."""
    if site == "first_site" and not op.endswith("_sp"):
        pytest.skip("only single-pass sites have a first site (prev_pre None)")
    for C, fmts in ((96, ("e4m3_g32",)), (256, ("e4m3_g128", "e4m3_g32"))):
        d = cases.make_inputs(op, (7,), 4, C, torch.bfloat16, norm_weight=True, seed=C)
        d["residual"][0, :, 32:64] = 0.0
        d["residual"][1, 0, 40] = float("inf")
        if op.startswith("post"):
            d["layer_output"][0, 32:64] = 0.0
        if site != "out_norm":
            d["out_norm_weight"] = None
        if site == "first_site":
            d["prev_pre"] = None
        li_at = 1 if op.startswith("post") else 0
        with torch.no_grad(), mk.use_backend(backend):
            plain = _boundary_call(op, d)
            for fmt in fmts:
                out = _boundary_call(op, d, out_fp8=fmt)
                assert len(out) == len(plain) + 2
                for a, b in zip(out[:len(plain)], plain):
                    assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(
                        a.nan_to_num(), b.nan_to_num())
                codes, scales = out[-2:]
                assert codes.shape == (7, C) and scales.shape == (7, C // FORMATS[fmt])
                _assert_exact(codes, scales, out[li_at], FORMATS[fmt])
                assert not torch.isnan(scales[0].float()).any() and (codes[0, 32:64].float() == 0).all()
                assert torch.isnan(scales[1].float()).any()


def test_the_boundary_ops_without_fp8_return_empty_copies():
    """The op level: ``fp8_group=0`` (the default) gives ``(T, 0)`` codes and scales, no kernel work."""
    d = cases.make_inputs("mhc_pre_sp", (3,), 2, 64, torch.bfloat16, norm_weight=True)
    out = torch.ops.mhc.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"])
    # the op returns the codes as their uint8 bytes (custom-op tooling reduces every output; float8 cannot be)
    assert out[-2].shape == (3, 0) and out[-2].dtype == torch.uint8 and out[-1].shape == (3, 0)
    out = torch.ops.mhc.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"], fp8_group=32)
    assert out[-2].shape == (3, 64) and out[-1].shape == (3, 2)
    with pytest.raises(mk.MHCInputError, match=r"argument 'fp8_group'.*must be 0 \(no FP8 copy\), 128 "
                                               r"\('e4m3_g128'\), 32 \('e4m3_g32'\); got 64"):
        torch.ops.mhc.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"], fp8_group=64)
    with pytest.raises(mk.MHCInputError, match=r"C = 64 columns.*not a multiple of the FP8 group 128"):
        torch.ops.mhc.mhc_pre_sp(d["residual"], d["prev_pre"], d["fn"], d["scale"], d["base"], fp8_group=128)


def test_bad_formats_and_widths_are_refused_with_the_argument():
    x = torch.randn(2, 200, dtype=torch.bfloat16)
    with pytest.raises(mk.MHCInputError, match=r"needs C a multiple of 128.*got C=200"):
        mk.quantize_fp8(x)
    with pytest.raises(mk.MHCInputError, match=r"needs C a multiple of 32"):
        mk.quantize_fp8(x, "e4m3_g32")
    with pytest.raises(mk.MHCInputError, match=r"'e4m3_g128', 'e4m3_g32' or None; got 'e5m2'"):
        mk.quantize_fp8(torch.randn(2, 128), "e5m2")
    d = cases.make_inputs("mhc_pre", (3,), 4, 96, torch.bfloat16)
    with pytest.raises(mk.MHCInputError, match=r"mhc\.mhc_pre: FP8 format 'e4m3_g128' needs C a multiple of 128.*"
                                               r"or 'e4m3_g32'"):
        mk.mhc_pre(d["residual"], d["fn"], d["scale"], d["base"], out_fp8="e4m3_g128")
    with pytest.raises(mk.MHCInputError,
                       match=r"argument 'group'.*one of 128 \('e4m3_g128'\), 32 \('e4m3_g32'\); got 64"):
        torch.ops.mhc.quantize_fp8(torch.randn(2, 128), 64)


def test_spec_bytes_count_one_byte_per_code_and_the_stored_scale_width():
    T, C = 16, 4096
    for group, scale_bytes in ((128, 4), (32, 1)):    # float32 scales; E8M0 bytes
        want = T * C * 2 + T * C * 1 + T * (C // group) * scale_bytes
        assert SPECS["quantize_fp8"].bytes(T, 1, C, torch.bfloat16, G=C // group) == want
        # a boundary's FP8 copy counts only when present: C code bytes and the scales per token
        spec, n = SPECS["post_pre_sp"], 4
        plain = spec.bytes(T, n, C, torch.bfloat16)
        with_fp8 = spec.bytes(T, n, C, torch.bfloat16, present=("fp8_codes", "fp8_scales"), Q=C, G=C // group)
        assert with_fp8 - plain == T * C + T * (C // group) * scale_bytes


def test_codes_times_scales_reconstruct_the_input():
    """What a user relies on: dequantised values are within half an e4m3 step (2^-4 relative, plus the
    subnormal floor) of the input."""
    x = torch.randn(4, 512, dtype=torch.bfloat16) * 3
    for fmt, group in FORMATS.items():
        codes, scales = mk.quantize_fp8(x, fmt)
        back = codes.float().unflatten(-1, (-1, group)) * scales.float().unsqueeze(-1)
        err = (back.flatten(-2) - x.float()).abs()
        assert bool((err <= x.float().abs() * 2 ** -4 + scales.float().repeat_interleave(group, -1) * 2 ** -10).all())


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("backend_name", ["triton", "tilelang", "reference"])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_codes_and_scales_equal_the_oracle_on_the_gpu(backend_name, fmt):
    """Production width on a GPU: the division and rounding instructions the hardware runs."""
    if not mk.available_backends("cuda")[backend_name].available:
        pytest.skip(mk.available_backends("cuda")[backend_name].reason)
    group = FORMATS[fmt]
    x = _awkward_input(64, 7168, group, torch.bfloat16)
    with mk.use_backend(backend_name):
        codes, scales = mk.quantize_fp8(x.cuda(), fmt)
    _assert_exact(codes.cpu(), scales.cpu(), x, group)


@pytest.mark.gpu
@pytest.mark.parametrize("backend_name", ["triton", "tilelang"])
def test_quantize_launches_past_65535_token_blocks_on_the_gpu(backend_name):
    """T = 65537 tokens, one token per CTA row: past the 65535 CTAs a grid may have on blockIdx.y, so a kernel that
    put its tokens there would not launch (the CPU emulator runs any grid; emulate.Launch.limit_problems checks
    every TileLang kernel's grid statically). Both formats, bitwise equal to the torch reference on the GPU."""
    if not mk.available_backends("cuda")[backend_name].available:
        pytest.skip(mk.available_backends("cuda")[backend_name].reason)
    g = torch.Generator(device="cuda").manual_seed(5)
    # C = 256: the width at which the gpu-tests fill plan has both groups' kernels
    x = (torch.randn(65537, 256, device="cuda", generator=g) * 3).to(torch.bfloat16)
    for fmt in FORMATS:
        with mk.use_backend(backend_name):
            codes, scales = mk.quantize_fp8(x, fmt)
        with mk.use_backend("reference"):
            want_codes, want_scales = mk.quantize_fp8(x, fmt)
        assert torch.equal(codes.view(torch.uint8), want_codes.view(torch.uint8)), fmt
        assert torch.equal(scales.view(torch.uint8), want_scales.view(torch.uint8)), fmt


@pytest.mark.gpu
@pytest.mark.gpu_smoke
@pytest.mark.parametrize("backend_name", ["triton", "tilelang"])
@pytest.mark.parametrize("op", ["post_pre", "post_pre_sp"])
def test_the_fused_fp8_copy_equals_the_oracle_on_the_gpu(backend_name, op):
    """The copy written by the boundary's tail kernel at a production shape (n=4, C=7168, T=257 -- no multiple of
    a block, and a gpu_smoke shape, so ``compile --fill-cache`` builds its kernels; the V4.1 boundary with the
    sublayer's norm), both formats: exact against the oracle's quantisation of the layer input the same call
    returns."""
    if not mk.available_backends("cuda")[backend_name].available:
        pytest.skip(mk.available_backends("cuda")[backend_name].reason)
    d = cases.make_inputs(op, (257,), 4, 7168, torch.bfloat16, "cuda", norm_weight=True, seed=3)
    with torch.no_grad(), mk.use_backend(backend_name):
        for fmt, group in FORMATS.items():
            out = _boundary_call(op, d, out_fp8=fmt)
            _assert_exact(out[-2].cpu(), out[-1].cpu(), out[1].cpu(), group)
