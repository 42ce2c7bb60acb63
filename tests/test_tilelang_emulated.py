"""The TileLang kernels' generated CUDA, executed on CPU threads, against the float64 oracle.

``MHC_TILELANG_EMULATE=1`` (set here for this module only) makes the TileLang backend
serve CPU tensors: each kernel is lowered for sm_90a exactly as for a GPU and its
generated CUDA source is compiled as host C++ against ``tilelang_src/cuda_emu.h``
(``tilelang_src/emulate.py``). So these tests run the same index arithmetic, masks,
loops, shared-memory staging, barriers and float32 math as the GPU would, on every op
forward and backward, with awkward shapes; what they cannot run are the tensor-core
(``mma``) projection variants (refused, tested below). One OS thread per CUDA thread:
shapes stay small. The GPU tests (test_tilelang_gpu.py) remain the word on real hardware.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed (pip install 'mhc-kernels[tilelang]')")
if shutil.which(os.environ.get("CXX", "g++")) is None:
    pytest.skip("no host C++ compiler (g++) to build the emulated kernels", allow_module_level=True)

import mhc_kernels as mk  # noqa: E402
from mhc_kernels.reference import cases, torch_ref  # noqa: E402
from mhc_kernels.tilelang_src import EMULATE_ENV  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _emulate():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(EMULATE_ENV, "1")
        yield


OPS_WITHOUT_C = ("split_mixes", "sinkhorn")
VARIANTS = [  # every n, C odd / not a multiple of any block / 1, T in {0, 1, 5, 37, (2, 3)}, each dtype
    dict(n=4, C=33, lead=(5,), dtype=torch.bfloat16, nw=True, consts={}),
    dict(n=1, C=1, lead=(1,), dtype=torch.float32, nw=False, consts={"sinkhorn_iters": 1}),
    dict(n=8, C=64, lead=(37,), dtype=torch.float16, nw=True, consts=cases.LOUD_CONSTS),
    dict(n=2, C=200, lead=(0,), dtype=torch.float32, nw=False, consts={}),
    dict(n=2, C=40, lead=(2, 3), dtype=torch.float32, nw=True, consts={"sinkhorn_iters": 20}),
    dict(n=4, C=72, lead=(300,), dtype=torch.bfloat16, nw=False, consts={}),  # several token blocks per grid
    # production widths (a few tokens: one OS thread per CUDA thread)
    dict(n=4, C=4096, lead=(3,), dtype=torch.bfloat16, nw=True, consts={}),
    dict(n=4, C=7168, lead=(2,), dtype=torch.bfloat16, nw=False, consts={}),
]


def _assert_ok(results, context):
    bad = [r for r in results if not r.ok]
    assert not bad, f"{context}: " + "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


# the ops without a hidden dim are not repeated at the production widths
CASES = [(op, v) for v in VARIANTS for op in cases.CASES if not (op in OPS_WITHOUT_C and v["C"] > 1000)]


@pytest.mark.parametrize("op,v", CASES, ids=lambda c: c if isinstance(c, str) else
                         f"n{c['n']}-C{c['C']}-T{c['lead']}-{str(c['dtype'])[6:]}")
def test_tilelang_matches_oracle(op, v, served):
    C = 1 if op in OPS_WITHOUT_C else v["C"]
    inputs = cases.make_inputs(op, v["lead"], v["n"], C, v["dtype"], "cpu", norm_weight=v["nw"], consts=v["consts"])
    with mk.use_backend("tilelang"):
        fwd = cases.check_forward(mk, op, inputs)
        bwd = cases.check_backward(mk, op, inputs)
    _assert_ok(fwd + bwd, f"{op} {v}")
    assert op in served and all(b == {"tilelang"} for b in served.values()), served
    if v["lead"] != (0,):
        assert any(name.endswith("_bwd") for name in served), served


@pytest.mark.parametrize("n,C,lead,L,dtype", [(4, 33, (5,), 3, torch.bfloat16), (8, 64, (2, 3), 2, torch.float16),
                                              (1, 1, (1,), 1, torch.float32)], ids=str)
def test_multilayer_recompute(n, C, lead, L, dtype, served):
    from mhc_kernels.recompute import multilayer_recompute

    inputs = cases.make_recompute_inputs(lead, n, C, L, dtype, "cpu")
    with mk.use_backend("tilelang"), torch.no_grad():
        _assert_ok(cases.check_recompute(multilayer_recompute, inputs), f"multilayer_recompute n={n} C={C} L={L}")
    assert served == {"multilayer_recompute": {"tilelang"}}, served


def _pre_inputs(op, n, C, T, dtype):
    inputs = cases.make_inputs(op, (T,), n, C, dtype, "cpu", norm_weight=True)
    consts = [inputs[k] for k in ("norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")]
    return inputs, consts


@pytest.mark.parametrize("n,C,T,splits", [(4, 64, 37, 1), (4, 33, 5, 3), (8, 16, 9, 2), (1, 7, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_mhc_pre_equals_the_kernel_chain_bitwise(n, C, T, splits, dtype):
    """The fused tail does the chain's arithmetic operation for operation (fused.py's claim)."""
    from mhc_kernels.tilelang_src import composite, mixes, norm, streaming

    inputs, consts = _pre_inputs("mhc_pre", n, C, T, dtype)
    x, fn, nw, scale, base = (inputs[k] for k in ("residual", "fn", "norm_weight", "scale", "base"))
    cfg = dict(composite.default_config("mhc_pre", norm.Shape(T, n, C, dtype)), splits=splits)
    fused = composite.mhc_pre_fwd(x, fn, scale, base, nw, *consts, config=cfg)
    mixes_, rstd = norm.norm_fn_fwd(x, fn, nw, consts[0], config=composite._plain(cfg))
    pre, post, comb = mixes.split_mixes_fwd(mixes_, scale, base, *consts[1:])
    layer_input = streaming.pre_apply_mix_fwd(x, pre)
    for name, a, b in zip(("layer_input", "post", "comb", "mixes", "rstd"), fused,
                          (layer_input, post, comb, mixes_, rstd)):
        assert torch.equal(a, b), f"{name}: max |diff| {(a.float() - b.float()).abs().max()}"


@pytest.mark.parametrize("n,C,T,splits", [(4, 64, 37, 2), (4, 33, 5, 1), (8, 16, 9, 4), (2, 1, 3, 1)], ids=str)
def test_fused_post_pre_matches_post_then_mhc_pre(n, C, T, splits):
    from mhc_kernels.tilelang_src import composite, norm, streaming

    inputs = cases.make_inputs("post_pre", (T,), n, C, torch.bfloat16, "cpu", norm_weight=True)
    names = ("layer_output", "residual", "post_mix", "comb_mix", "fn", "scale", "base", "norm_weight", "norm_eps",
             "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")
    args = [inputs[k] for k in names]
    cfg = dict(composite.default_config("post_pre", norm.Shape(T, n, C, torch.bfloat16)), splits=splits)
    got = composite.post_pre_fwd(*args, config=cfg)
    new_res = streaming.post_fwd(*args[:4])
    want = (new_res,) + composite.mhc_pre_fwd(new_res, *args[4:], config=cfg)
    assert torch.equal(got[0], want[0]), "the new residual is post's, bit for bit"
    # float32 outputs to accumulation error; the bf16 layer input to one rounding step (its float32 value
    # moves by that error too, which can flip the last bit)
    torch.testing.assert_close(got[1].float(), want[1].float(), rtol=2 ** -7, atol=1e-5, msg="layer_input")
    for name, a, b in zip(("post", "comb", "mixes", "rstd"), got[2:], want[2:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_configs_in_the_spaces_are_correct():
    """Non-default tilings (the tuner's candidates) run correctly too: streaming kernels and the fused tail."""
    from mhc_kernels.tilelang_src import backend, common, composite

    for op, names in (("post", ("layer_output", "residual", "post_mix", "comb_mix")),
                      ("pre_apply_mix", ("residual", "pre_mix"))):
        inputs = cases.make_inputs(op, (7,), 4, 24, torch.bfloat16, "cpu")
        args = [inputs[k] for k in names]
        ref = getattr(torch_ref, f"{op}_fwd")(*args)
        space = backend.OPS[op].space(common.Shape(7, 4, 24, torch.bfloat16))
        for cfg in space[::max(1, len(space) // 6)]:
            out = backend.OPS[op].fn(*args, config=cfg)
            torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2, msg=str(cfg))
    inputs, consts = _pre_inputs("mhc_pre", 4, 24, 7, torch.float32)
    args = [inputs[k] for k in ("residual", "fn", "scale", "base", "norm_weight")] + consts
    ref = torch_ref.mhc_pre_fwd(*args)
    space = composite.config_space("mhc_pre", common.Shape(7, 4, 24, torch.float32))
    for cfg in space[::max(1, len(space) // 6)]:
        for a, b in zip(composite.mhc_pre_fwd(*args, config=cfg), ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=str(cfg))


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_norm_fn_split_k_paths_agree(splits):
    from mhc_kernels.tilelang_src import norm

    inputs = cases.make_inputs("norm_fn", (9,), 4, 40, torch.bfloat16, "cpu")
    x, fn = inputs["residual"], inputs["fn"]
    ref_m, ref_r = torch_ref.norm_fn_fwd(x, fn, None, 1e-6)
    cfg = dict(norm.default_config("norm_fn", norm.Shape(9, 4, 40, torch.bfloat16)), splits=splits)
    m, r = norm.norm_fn_fwd(x, fn, None, 1e-6, config=cfg)
    torch.testing.assert_close(m, ref_m, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r, ref_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["sinkhorn_bwd", "split_mixes_bwd"])
@pytest.mark.parametrize("iters,stride", [(20, 1), (20, 3), (7, 6)])
def test_sinkhorn_backward_checkpoint_segments(op, iters, stride):
    """The segment-recompute schedule (ck_stride > 1) runs to the same gradient as keeping every round."""
    from mhc_kernels.tilelang_src import mixes

    n, T = 4, 21
    g = torch.Generator().manual_seed(1)
    cfg = {"block_T": 16, "ck_stride": stride}
    if op == "sinkhorn_bwd":
        logits, grad = torch.randn(T, n, n, generator=g), torch.randn(T, n, n, generator=g)
        got = mixes.sinkhorn_bwd(grad, logits, iters, 1e-6, config=cfg)
        want = torch_ref.sinkhorn_bwd(grad, logits, iters, 1e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    else:
        m = n * (n + 2)
        mx, scale, base = torch.randn(T, m, generator=g), torch.rand(3, generator=g) + 0.5, torch.randn(m, generator=g)
        gp, gq, gc = torch.randn(T, n, generator=g), torch.randn(T, n, generator=g), torch.randn(T, n, n, generator=g)
        got = mixes.split_mixes_bwd(gp, gq, gc, mx, scale, base, 2.0, iters, 1e-6, config=cfg)
        want = torch_ref.split_mixes_bwd(gp, gq, gc, mx, scale, base, 2.0, iters, 1e-6)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tensor_core_variant_is_refused_clearly():
    from mhc_kernels.tilelang_src import norm
    from mhc_kernels.tilelang_src.emulate import EmulationError

    inputs = cases.make_inputs("norm_fn", (3,), 4, 64, torch.bfloat16, "cpu")
    cfg = dict(norm.default_config("norm_fn", norm.Shape(3, 4, 64, torch.bfloat16)), mma="3xtf32", block_T=32,
               block_K=64, splits=1)
    with pytest.raises(EmulationError, match="tensor-core"):
        norm.norm_fn_fwd(inputs["residual"], inputs["fn"], None, 1e-6, config=cfg)


def test_cpu_refused_without_emulation(monkeypatch):
    monkeypatch.setenv(EMULATE_ENV, "0")
    x = torch.randn(2, 4, 8)
    with mk.use_backend("tilelang"), pytest.raises(mk.BackendError, match=EMULATE_ENV):
        mk.pre_apply_mix(x, torch.rand(2, 4))
