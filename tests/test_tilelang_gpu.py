"""TileLang kernels on a CUDA device against the float64 oracle (skipped without CUDA).

Every public op runs forward and backward through ``mhc_kernels`` with
``use_backend("tilelang")`` (so each forward kernel and each ``*_bwd`` kernel serves it)
and is compared with the oracle under ``reference.cases`` tolerances. Shapes: every n in
{1, 2, 4, 8}, C in {1280, 4096, 7168, 200} and an odd C, T from 0 to 16384 (the
split-K and single-pass norm paths are both exercised), every residual dtype,
norm_weight on and off, default and "loud" constants. Kernel-level checks cover the
paths the public ops do not reach directly (explicit configs, determinism), among them
the tensor-core (TF32) norm_fn projection, which no default config selects.
"""

import pytest
import torch

pytest.importorskip("tilelang", reason="tilelang is not installed")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (TileLang kernels run on CUDA only)", allow_module_level=True)

import tilelang_checks  # noqa: E402
from op_samples import fused_single_pass_matches_its_parts, resolved_config  # noqa: E402

import mhc_kernels as mk  # noqa: E402
from mhc_kernels.reference import cases, torch_ref  # noqa: E402

pytestmark = pytest.mark.gpu

OPS = tuple(cases.CASES)  # norm_fn, split_mixes, sinkhorn, pre_apply_mix, post, mhc_pre, expand, mhc_head, post_pre
SMOKE = pytest.mark.gpu_smoke   # the short tier: production n=4 at T=1 and a few hundred, odd C, T=0


def smoke(*values):
    return pytest.param(*values, marks=SMOKE)


SHAPES = [  # (n, C, T)
    (4, 4096, 16384), (4, 7168, 4096), (4, 1280, 37), (4, 200, 13), smoke(4, 201, 5),
    (1, 4096, 1), (2, 4096, 1000), (8, 4096, 257), (8, 200, 3), smoke(2, 1280, 0),
    smoke(4, 4096, 1), smoke(4, 7168, 257),
]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _assert_ok(results, ctx):
    bad = [r for r in results if not r.ok]
    assert not bad, f"{ctx}: " + "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n,C,T", SHAPES, ids=lambda v: str(v))
def test_forward_backward_bf16(op, n, C, T, served):
    inputs = cases.make_inputs(op, (T,), n, C, torch.bfloat16, "cuda", norm_weight=(n % 2 == 0))
    with mk.use_backend("tilelang"):
        _assert_ok(cases.check_forward(mk, op, inputs), f"{op} fwd n={n} C={C} T={T}")
        _assert_ok(cases.check_backward(mk, op, inputs), f"{op} bwd n={n} C={C} T={T}")
    assert all(b == {"tilelang"} for b in served.values()), served


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_loud_constants(op, dtype):
    inputs = cases.make_inputs(op, (3, 11), 4, 4096, dtype, "cuda", norm_weight=True, consts=cases.LOUD_CONSTS)
    with mk.use_backend("tilelang"):
        _assert_ok(cases.check_forward(mk, op, inputs), f"{op} fwd {dtype}")
        _assert_ok(cases.check_backward(mk, op, inputs), f"{op} bwd {dtype}")


def test_every_config_in_the_space_is_correct():
    tilelang_checks.configs_in_the_space_are_correct("cuda", 77, 1280, lambda space: space[:12])


@pytest.mark.parametrize("n,C,T,splits", [smoke(4, 4096, 4096, 1), (4, 7168, 13, 8), (8, 200, 37, 2), (1, 201, 1, 1),
                                          (2, 1280, 1000, 4)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_mhc_pre_equals_the_kernel_chain_bitwise(n, C, T, splits, dtype):
    tilelang_checks.fused_mhc_pre_equals_the_chain("cuda", n, C, T, splits, dtype)


@pytest.mark.parametrize("n,C,T,splits", [smoke(4, 4096, 4096, 1), smoke(4, 7168, 1, 64), (4, 7168, 13, 8),
                                          (8, 200, 37, 2), (2, 201, 5, 2)], ids=str)
def test_fused_mhc_pre_with_the_sublayer_norm_equals_the_chain_bitwise(n, C, T, splits):
    """The two-launch mhc_pre with the sublayer's norm (fused._build_pre_norm_tail) against the chain with the
    collapse-norm kernel and the three-launch path it replaced: every output bit for bit."""
    tilelang_checks.fused_mhc_pre_equals_the_chain("cuda", n, C, T, splits, torch.bfloat16, out_norm=True)


@pytest.mark.parametrize("n,C,T,splits", [smoke(4, 4096, 4096, 8), (4, 7168, 13, 1), (8, 200, 37, 3), (1, 201, 1, 2)],
                         ids=str)
@pytest.mark.parametrize("mma", ["fma", "3xtf32"])
@pytest.mark.parametrize("out_norm", [False, True], ids=["plain", "out_norm"])
def test_fused_post_pre_matches_post_then_mhc_pre(n, C, T, splits, mma, out_norm):
    tilelang_checks.fused_post_pre_matches_post_then_mhc_pre("cuda", n, C, T, splits, mma, out_norm=out_norm)


@pytest.mark.parametrize("n,C,T,splits", [(4, 4096, 4096, 1), (4, 7168, 13, 8), (8, 200, 37, 3), (1, 201, 1, 2)],
                         ids=str)
@pytest.mark.parametrize("with_post", [False, True], ids=["mhc_pre_sp", "post_pre_sp"])
@pytest.mark.parametrize("first,normalize", [(False, True), (True, False), (False, False)], ids=str)
def test_fused_single_pass_matches_its_parts(n, C, T, splits, with_post, first, normalize):
    fused_single_pass_matches_its_parts("tilelang", "cuda", n, C, T, splits, torch.bfloat16, with_post, first,
                                                        normalize)


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_norm_fn_split_k_paths_agree(splits):
    tilelang_checks.norm_fn_split_k_paths_agree("cuda", 300, 1280, splits)


# The tensor-core projection (config key mma): explicit configs, every path (fused and split-K, token and
# K tails, float32 x, fn with n rows as in mhc_head). "3xtf32" is held to the float32 contract (it is what
# config_space offers the tuner); plain "tf32" (~2^-11 relative per product) to 2e-3 of the largest output.
MMA_SHAPES = [  # (n, C, T, dtype, splits, block_T, block_K)
    smoke(4, 4096, 300, torch.bfloat16, 1, 32, 128), (4, 4096, 300, torch.bfloat16, 4, 64, 64),
    (8, 200, 13, torch.bfloat16, 2, 32, 64), (1, 201, 37, torch.float32, 1, 32, 64),
    (2, 1280, 1000, torch.float16, 1, 64, 256), (4, 4096, 77, torch.float32, 3, 32, 128),
    (8, 7168, 64, torch.bfloat16, 1, 64, 64), (4, 201, 5, torch.bfloat16, 1, 64, 128),
]


@pytest.mark.parametrize("mode", ["3xtf32", "tf32"])
@pytest.mark.parametrize("n,C,T,dtype,splits,bt,bk", MMA_SHAPES, ids=str)
@pytest.mark.parametrize("head", [False, True], ids=["mixes", "head_rows"])
def test_norm_fn_tensor_core_modes(mode, n, C, T, dtype, splits, bt, bk, head):
    import numpy as np

    from mhc_kernels.reference import oracle, transcription
    from mhc_kernels.tilelang_src import norm

    inputs = cases.make_inputs("norm_fn", (T,), n, C, dtype, "cuda", norm_weight=True)
    x, fn, nw, eps = inputs["residual"], inputs["fn"], inputs["norm_weight"], inputs["norm_eps"]
    if head:
        fn = fn[:n].contiguous()
    cfg = dict(norm.default_config("norm_fn", norm.Shape(T, n, C, dtype)), mma=mode, block_T=bt, block_K=bk,
               split_K=splits)
    m, r = norm.norm_fn_fwd(x, fn, nw, eps, config=cfg)
    expected = oracle.norm_fn(x, fn, nw, eps)
    naive = transcription.norm_fn(x.cpu(), fn.cpu(), nw.cpu(), eps)
    rr = cases.compare("rstd", r, oracle.rstd(x, eps))
    assert rr.ok, rr.detail
    if mode == "3xtf32":
        res = cases.compare("mixes", m, expected, naive=naive)
        assert res.ok, f"ratio {res.worst_ratio:.3g}: {res.detail}"
    else:
        err = np.abs(oracle.f64(m) - expected).max()
        assert err <= 2e-3 * np.abs(expected).max(), err


def test_backward_is_deterministic():
    inputs = cases.make_inputs("mhc_pre", (4096,), 4, 4096, torch.bfloat16, "cuda", norm_weight=True)
    outs = []
    for _ in range(2):
        leaves = {k: (v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
                      else v) for k, v in inputs.items()}
        with mk.use_backend("tilelang"):
            res = cases.CASES["mhc_pre"].run(mk, leaves)
            torch.autograd.backward(res, [torch.ones_like(o) for o in res])
        outs.append([leaves[k].grad.clone() for k in ("residual", "fn", "scale", "base", "norm_weight")])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_sinkhorn_bwd_direct_matches_reference():
    from mhc_kernels.tilelang_src import mixes

    for n in (1, 2, 4, 8):
        for iters in (1, 3, 20):
            g = torch.Generator().manual_seed(n * 100 + iters)
            L = (torch.randn(333, n, n, generator=g) * 1.5).cuda()
            G = torch.randn(333, n, n, generator=g).cuda()
            fwd_cfg = resolved_config("tilelang", "sinkhorn", L, iters, 1e-6)
            bwd_cfg = resolved_config("tilelang", "sinkhorn_bwd", G, L, iters, 1e-6)
            torch.testing.assert_close(mixes.sinkhorn_fwd(L, iters, 1e-6, config=fwd_cfg),
                                       torch_ref.sinkhorn_fwd(L, iters, 1e-6), rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(mixes.sinkhorn_bwd(G, L, iters, 1e-6, config=bwd_cfg),
                                       torch_ref.sinkhorn_bwd(G.double(), L.double(), iters, 1e-6).float(),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n,C,T,L", [(4, 4096, 4096, 3), (8, 200, 13, 2), (1, 1280, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_multilayer_recompute(n, C, T, L, dtype, served):
    from mhc_kernels.recompute import multilayer_recompute

    inputs = cases.make_recompute_inputs((T,), n, C, L, dtype, "cuda")
    with mk.use_backend("tilelang"), torch.no_grad():
        _assert_ok(cases.check_recompute(multilayer_recompute, inputs), f"multilayer_recompute n={n} C={C} L={L}")
    assert served == {"multilayer_recompute": {"tilelang"}}, served


@pytest.mark.gpu_smoke
def test_a_residual_off_a_16_byte_boundary_is_served_by_triton():
    """A contiguous residual at an odd storage offset: TileLang's 16-byte vector accesses would fault on it, so the
    registry serves the call with Triton (its compiler specialises on pointer alignment) and the result equals the
    aligned call's, TileLang's, to the bf16 rounding (both compute in float32 and round once)."""
    if not mk.available_backends("cuda")["triton"].available:
        pytest.skip(mk.available_backends("cuda")["triton"].reason)
    d = cases.make_inputs("post", (300,), 4, 4096, torch.bfloat16, "cuda", seed=2)   # a gpu_smoke shape
    buf = torch.empty(d["residual"].numel() + 3, dtype=torch.bfloat16, device="cuda")
    off = buf[3:].view(d["residual"].shape)
    off.copy_(d["residual"])
    args = (d["layer_output"], off, d["post_mix"], d["comb_mix"])
    assert mk.which_backend("post", *args) == "triton"
    got = mk.mhc_post(*args)
    want = mk.mhc_post(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-3)
