"""The Triton backend through the public API and the custom ops (CPU: Triton interpreter).

Kernel-level tests live in test_triton_mix.py and test_triton_norm_sinkhorn.py; this
file checks the backend as users see it: every op forward and backward through
``mhc_kernels`` with ``use_backend("triton")`` against the float64 oracle, opcheck
and torch.compile with the backend forced, the fused site backward, and refusals.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from op_samples import SP_FUSED_CASES, fused_single_pass_matches_its_parts, op_args  # noqa: E402

import mhc_kernels as mk  # noqa: E402
from mhc_kernels import BackendError  # noqa: E402
from mhc_kernels.reference import cases  # noqa: E402

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS_WITHOUT_C = ("split_mixes", "sinkhorn")

# A covering set (the interpreter runs each program instance in Python): every n,
# awkward C, T in {0, 1, 5, 37}, leading dims, each dtype, norm_weight, loud constants.
VARIANTS = [
    dict(n=4, C=33, lead=(5,), dtype=torch.bfloat16, nw=True, consts={}),
    dict(n=1, C=1, lead=(1,), dtype=torch.float32, nw=False, consts={"sinkhorn_iters": 1}),
    dict(n=8, C=64, lead=(37,), dtype=torch.float16, nw=True, consts=cases.LOUD_CONSTS),
    dict(n=2, C=200, lead=(0,), dtype=torch.float32, nw=False, consts={}),
    dict(n=2, C=40, lead=(2, 3), dtype=torch.float32, nw=True, consts={"sinkhorn_iters": 20}),
]


def _assert_ok(results, context):
    bad = [r for r in results if not r.ok]
    assert not bad, f"{context}: " + "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


@pytest.mark.parametrize("op", list(cases.CASES))
@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: f"n{v['n']}-C{v['C']}-T{v['lead']}-{str(v['dtype'])[6:]}")
def test_triton_matches_oracle(op, v, served):
    C = 1 if op in OPS_WITHOUT_C else v["C"]
    inputs = cases.make_inputs(op, v["lead"], v["n"], C, v["dtype"], DEVICE, norm_weight=v["nw"],
                               consts=v["consts"])
    with mk.use_backend("triton"):
        fwd = cases.check_forward(mk, op, inputs)
        bwd = cases.check_backward(mk, op, inputs)
    _assert_ok(fwd + bwd, f"{op} {v}")
    assert op in served and all(b == {"triton"} for b in served.values()), served
    if v["lead"] != (0,) and cases.CASES[op].differentiable:  # the backward ran on Triton kernels too
        assert any(name.endswith("_bwd") for name in served), served


@pytest.mark.parametrize("n,C,lead,L,dtype", [(4, 33, (5,), 3, torch.bfloat16), (1, 1, (1,), 1, torch.float32),
                                              (8, 64, (2, 3), 2, torch.float16), (2, 40, (0,), 2, torch.float32)])
def test_multilayer_recompute_on_triton_matches_oracle(n, C, lead, L, dtype, served):
    from mhc_kernels.recompute import multilayer_recompute

    inputs = cases.make_recompute_inputs(lead, n, C, L, dtype, DEVICE)
    with mk.use_backend("triton"):
        _assert_ok(cases.check_recompute(multilayer_recompute, inputs), f"multilayer_recompute n={n} C={C} L={L}")
    assert served == {"multilayer_recompute": {"triton"}}, served


def test_triton_equals_reference_backend_on_a_site():
    d = cases.make_inputs("mhc_pre", (6,), 4, 48, torch.float32, DEVICE, norm_weight=True)
    outs = {}
    for backend in ("reference", "triton"):
        leaves = {k: d[k].detach().clone().requires_grad_() for k in ("residual", "fn", "scale", "base",
                                                                      "norm_weight")}
        with mk.use_backend(backend):
            li, post_mix, comb_mix = mk.mhc_pre(leaves["residual"], leaves["fn"], leaves["scale"], leaves["base"],
                                                norm_weight=leaves["norm_weight"])
            new = mk.mhc_post(torch.tanh(li), leaves["residual"], post_mix, comb_mix)
            new.square().sum().backward()
        outs[backend] = [new.detach()] + [leaves[k].grad for k in leaves]
    for a, b in zip(outs["reference"], outs["triton"]):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(mk.SPECS))
def test_opcheck_with_triton_forced(name):
    args = op_args(name, lead=(3,), n=2, C=5, dtype=torch.float32, device=DEVICE)
    with mk.use_backend("triton"):
        torch.library.opcheck(getattr(torch.ops.mhc, name), args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_site_with_triton_forced():
    d = cases.make_inputs("mhc_pre", (4,), 2, 16, torch.float32, DEVICE, norm_weight=True)
    w = torch.randn(16, 16, device=DEVICE) / 4

    def site(x, fn, scale, base, nw):
        li, post_mix, comb_mix = mk.mhc_pre(x, fn, scale, base, norm_weight=nw)
        return mk.mhc_post(torch.relu(li @ w), x, post_mix, comb_mix)

    def run(f):
        leaves = [d[k].detach().clone().requires_grad_() for k in ("residual", "fn", "scale", "base", "norm_weight")]
        out = f(*leaves)
        out.square().sum().backward()
        return [out.detach()] + [t.grad for t in leaves]

    torch._dynamo.reset()
    with mk.use_backend("triton"):
        eager = run(site)
        compiled = run(torch.compile(site, fullgraph=True, backend="aot_eager"))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_post_pre_backward_accumulates_residual_gradient_once():
    """post_pre's backward hands the new residual's gradient to mhc_pre_bwd as grad_residual,
    so the site writes one residual-gradient tensor; compare with the unfused chain."""
    args = op_args("post_pre", lead=(5,), n=4, C=24, dtype=torch.float32, device=DEVICE)
    diff = [0, 1, 2, 3, 4, 5, 6, 7]
    results = {}
    for backend in ("reference", "triton"):
        leaves = [a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
        with mk.use_backend(backend):
            outs = torch.ops.mhc.post_pre(*leaves)
            loss = outs[0].square().sum() + outs[1].sin().sum() + outs[2].sum() + (outs[3] ** 2).sum()
            loss.backward()
        results[backend] = [leaves[i].grad for i in diff]
    for a, b in zip(results["reference"], results["triton"]):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)


def test_forced_triton_refuses_float64_and_wide_n_with_reasons():
    x = torch.randn(2, 4, 8, dtype=torch.float64, device=DEVICE)
    with mk.use_backend("triton"), pytest.raises(BackendError, match=r"triton.*float64.*reference"):
        mk.expand(x[:, 0], 4)
    y = torch.randn(2, 16, 8, device=DEVICE)
    with mk.use_backend("triton"), pytest.raises(BackendError, match=r"triton.*n=16"):
        mk.pre_apply_mix(y, torch.rand(2, 16, device=DEVICE))


def test_sinkhorn_ops_refuse_n_that_is_not_a_power_of_two_but_mixing_ops_serve_it(served):
    d = cases.make_inputs("mhc_pre", (3,), 3, 16, torch.float32, DEVICE)
    args = (d["residual"], d["fn"], d["scale"], d["base"])
    with mk.use_backend("triton"), pytest.raises(BackendError, match=r"triton.*power-of-two.*n=3"):
        mk.mhc_pre(*args)
    with mk.use_backend("triton"), pytest.raises(BackendError, match=r"n=3"):
        mk.sinkhorn(torch.randn(2, 3, 3, device=DEVICE))
    x = torch.randn(2, 3, 8, device=DEVICE)
    with mk.use_backend("triton"):  # the streaming kernels pad n to a power of two with masks
        _assert_ok(cases.check_forward(mk, "post", cases.make_inputs("post", (2,), 3, 8, torch.float32, DEVICE)),
                   "post n=3")
        mk.pre_apply_mix(x, torch.rand(2, 3, device=DEVICE))
    assert served.get("post") == {"triton"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU probe")
def test_triton_does_not_serve_cpu_without_the_interpreter():
    code = ("import mhc_kernels as mk; s = mk.available_backends('cpu')['triton']; "
            "print(s.available); print(s.reason)")
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    available, reason = out.strip().splitlines()
    assert available == "False" and "TRITON_INTERPRET=1" in reason


# -- GPU ------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("op", list(cases.CASES))
@pytest.mark.parametrize("T,n,C", [(16384, 4, 4096), (4096, 4, 7168), (1000, 8, 1280), (1, 2, 200),
                                   pytest.param(1, 4, 4096, marks=pytest.mark.gpu_smoke),
                                   pytest.param(257, 4, 7168, marks=pytest.mark.gpu_smoke),
                                   pytest.param(5, 4, 201, marks=pytest.mark.gpu_smoke),
                                   pytest.param(0, 2, 1280, marks=pytest.mark.gpu_smoke)])
def test_triton_matches_oracle_on_gpu(op, T, n, C):
    inputs = cases.make_inputs(op, (T,), n, 1 if op in OPS_WITHOUT_C else C, torch.bfloat16, "cuda",
                               norm_weight=True)
    with mk.use_backend("triton"):
        _assert_ok(cases.check_forward(mk, op, inputs) + cases.check_backward(mk, op, inputs), f"{op} T={T}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="about the CPU interpreter")
def test_the_interpreter_converts_float32_to_bf16_by_truncation():
    """Why the bf16 tolerance (reference/cases.py) allows a little over one ulp: the interpreter truncates
    float32 -> bf16 where the GPU rounds to nearest even. If a Triton release fixes this, this test fails
    and the tolerance can be tightened to the GPU's half an ulp."""
    import triton
    import triton.language as tl

    @triton.jit
    def to_bf16(x_ptr, y_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(y_ptr + i, tl.load(x_ptr + i).to(tl.bfloat16))

    x = torch.tensor([1.0 + 3 * 2 ** -9, -1.0 - 3 * 2 ** -9, 1.0 + 2 ** -9, 2.0], dtype=torch.float32)
    y = torch.empty(4, dtype=torch.bfloat16)
    to_bf16[(1,)](x, y, N=4)
    assert y.float().tolist() == [1.0, -1.0, 1.0, 2.0]                     # truncated toward zero
    assert x.bfloat16().float().tolist() == [1.0078125, -1.0078125, 1.0, 2.0]  # what rounding gives


@pytest.mark.parametrize("n,C,T,splits,dtype,with_post,first,normalize", SP_FUSED_CASES, ids=str)
def test_fused_single_pass_matches_its_parts(n, C, T, splits, dtype, with_post, first, normalize):
    """mhc_pre_sp / post_pre_sp's one-read kernels (single_pass.py) against Triton's own primitives."""
    fused_single_pass_matches_its_parts("triton", DEVICE, n, C, T, splits, dtype, with_post, first, normalize)
