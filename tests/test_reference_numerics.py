"""The PyTorch reference backend against the float64 NumPy oracle, forward and backward.

Every public operator, for residual dtypes bf16/fp16/fp32, n in {1, 2, 4, 8},
C in {1, 7, 64, 96, 1280}, T in {0, 1, 3, 33}, with and without leading batch dims,
with and without norm_weight, Sinkhorn rounds in {1, 2, 20} and a set of loud
non-default constants. Gradients are compared with autograd through the float64
transcription (whose forward is itself checked against the oracle here).
Tolerances: ``mhc_kernels.reference.cases.TOLERANCES``.
"""

import numpy as np
import pytest
import torch

import mhc_kernels as mk
from mhc_kernels.reference import cases, oracle, transcription

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
NS = [1, 2, 4, 8]
CS = [1, 7, 64, 96, 1280]
# (leading dims, norm_weight, constants): T in {0, 1, 3, 33}, no leading dims, two batch dims.
VARIANTS = [
    ((0,), False, {}),
    ((1,), True, {}),
    ((3,), False, {"sinkhorn_iters": 1}),
    ((33,), True, {"sinkhorn_iters": 2}),
    ((), False, {}),
    ((3, 11), True, cases.LOUD_CONSTS),
]
OPS_WITHOUT_C = ("split_mixes", "sinkhorn")


def _params():
    for op in cases.CASES:
        for dtype in DTYPES:
            for n in NS:
                for C in ([1] if op in OPS_WITHOUT_C else CS):
                    yield pytest.param(op, dtype, n, C, id=f"{op}-{str(dtype)[6:]}-n{n}-C{C}")


def _assert_all_ok(results, context):
    bad = [r for r in results if not r.ok]
    assert not bad, f"{context}: " + "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


@pytest.mark.parametrize("op,dtype,n,C", list(_params()))
def test_reference_matches_oracle(op, dtype, n, C):
    for lead, nw, consts in VARIANTS:
        inputs = cases.make_inputs(op, lead, n, C, dtype, norm_weight=nw, consts=consts)
        with mk.use_backend("reference"):
            fwd = cases.check_forward(mk, op, inputs)
            bwd = cases.check_backward(mk, op, inputs)
        _assert_all_ok(fwd + bwd, f"lead={lead} norm_weight={nw} consts={consts}")


@pytest.mark.parametrize("op", list(cases.CASES))
def test_transcription_matches_oracle_float64(op):
    """The gradient oracle's forward is the oracle's function (so its gradients are the oracle's)."""
    inputs = cases.make_inputs(op, (5,), 4, 24, torch.float64, norm_weight=True, consts=cases.LOUD_CONSTS)
    case = cases.CASES[op]
    for got, exp in zip(case.transcription(inputs), case.oracle(inputs)):
        np.testing.assert_allclose(oracle.f64(got), exp, rtol=1e-12, atol=1e-12)


def test_oracle_against_handwritten_values():
    """Anchor the oracle itself with values computed by hand."""
    # n = 1, C = 2: mixes = (x . fn_k) * rsqrt(mean(x^2) + eps)
    x = np.array([[[3.0, 4.0]]])
    fn = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    r = 1.0 / np.sqrt(12.5 + 1e-6)
    np.testing.assert_allclose(oracle.norm_fn(x, fn), [[3 * r, 4 * r, 7 * r]])
    # Sinkhorn of all-equal logits is uniform: softmax 1/n, +eps, columns sum (1 + n eps) ...
    P = oracle.sinkhorn(np.zeros((3, 3)), iters=1, eps=0.0)
    np.testing.assert_allclose(P, np.full((3, 3), 1 / 3))
    # post: out_i = post_i * y + sum_j comb[j, i] x_j
    out = oracle.post(np.array([1.0]), np.array([[2.0], [3.0]]), np.array([0.5, 2.0]),
                      np.array([[1.0, 0.0], [1.0, 1.0]]))
    np.testing.assert_allclose(out, [[0.5 + 2 + 3], [2.0 + 3]])


@pytest.mark.parametrize("op", [op for op, c in cases.CASES.items() if c.differentiable])
def test_gradcheck_float64(op):
    """torch.autograd.gradcheck of the explicit backward (float64, small shapes)."""
    inputs = cases.make_inputs(op, (2, 3), 2, 5, torch.float64, norm_weight=True, consts=cases.LOUD_CONSTS)
    case = cases.CASES[op]
    names = [k for k in case.differentiable if inputs.get(k) is not None]

    def f(*tensors):
        d = dict(inputs)
        d.update(zip(names, tensors))
        return case.run(mk, d)

    leaves = tuple(inputs[k].detach().clone().requires_grad_() for k in names)
    with mk.use_backend("reference"):
        assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


# -- Sinkhorn properties (contract §3) --------------------------------------------------------
@pytest.mark.parametrize("n", [2, 4, 8])
def test_sinkhorn_column_and_row_sums(n):
    logits = torch.rand(4096, n, n) * 2 - 1  # uniform in [-1, 1]
    P = mk.sinkhorn(logits, iters=20)
    assert (P.sum(-2) - 1).abs().max() < 1e-5  # the last step normalises columns
    assert (P.sum(-1) - 1).abs().max() < 1e-4  # rows converge for moderate logits


def test_sinkhorn_peaked_logits_follow_the_contract_not_convergence():
    logits = torch.randn(256, 4, 4) * 12  # strongly peaked: rows need not converge in 20 rounds
    P = mk.sinkhorn(logits, iters=20)
    exp = oracle.sinkhorn(logits, 20)
    r = cases.compare("sinkhorn(peaked)", P, exp)
    assert r.ok, r.detail
    assert (P.sum(-2) - 1).abs().max() < 1e-5
    assert np.abs(exp.sum(-1) - 1).max() > 1e-3, "test premise: rows are not converged at 20 rounds"


@pytest.mark.parametrize("magnitude", [1e2, 1e3, 1e4])
def test_sinkhorn_huge_logits_finite_and_exact(magnitude):
    logits = (torch.rand(512, 4, 4) * 2 - 1) * magnitude
    logits.requires_grad_()
    P = mk.sinkhorn(logits, iters=20)
    assert torch.isfinite(P).all()
    np.testing.assert_allclose(P.detach().numpy(), oracle.sinkhorn(logits, 20), rtol=1e-5, atol=1e-6)
    P.backward(torch.randn_like(P))
    assert torch.isfinite(logits.grad).all()
    ref = logits.detach().double().requires_grad_()
    transcription.sinkhorn(ref, 20).backward(torch.zeros_like(ref))  # graph builds in float64 too


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["mhc_pre", "mhc_pre_bwd", "mhc_head", "mhc_head_bwd", "post_pre"])
def test_reference_widening_the_residual_once_gives_the_shared_composites_bits(op, dtype):
    """The reference runs its residual-reading composites on the residual widened once (a cost change);
    the results are those of the shared composite over its primitives, bit for bit."""
    from mhc_kernels import composite, registry
    from mhc_kernels.validation import bind

    kernel = registry.get_kernel(op, "reference")
    assert kernel.fn.__name__.endswith("widened_once") or op == "post_pre"
    args = cases.op_args(op, (37,), 4, 40, dtype, "cpu", norm_weight=True, seed=3, optional=True)
    call = bind(mk.SPECS[op], args)
    impl, layout = composite.COMPOSITES[op]
    plain = composite.composite_kernel(op, "reference", {p.name: kernel.parts[p.name] for p in layout})
    for a, b in zip(kernel(*call.args), plain(*call.args)):
        assert a.dtype == b.dtype and torch.equal(a, b)


# -- the float64 oracle on the device (large shapes on a GPU) ------------------------------------------------
class _Perturbed:
    """``mhc_kernels`` with output ``index`` of op ``op`` moved by ``rel`` of its largest magnitude."""

    def __init__(self, op, index, rel=0.05):
        self.op, self.index, self.rel = op, index, rel

    def __getattr__(self, name):
        real = getattr(mk, name)
        if name != self.op:
            return real

        def call(*args, **kwargs):
            outs = list(real(*args, **kwargs))
            o = outs[self.index]
            outs[self.index] = o + (self.rel * float(o.detach().abs().max()) * torch.ones_like(o))
            return tuple(outs)

        return call


def test_oracle_device_picks_the_numpy_oracle_on_cpu_and_obeys_the_switch(monkeypatch):
    inputs = cases.make_inputs("post", (3,), 4, 8, torch.float32)
    assert cases.oracle_device(inputs) is None            # auto: CPU inputs keep the NumPy oracle
    monkeypatch.setenv(cases.ORACLE_ENV, "device")
    assert cases.oracle_device(inputs) == torch.device("cpu")
    monkeypatch.setenv(cases.ORACLE_ENV, "gpu")
    with pytest.raises(ValueError, match="auto, numpy or device"):
        cases.oracle_device(inputs)


@pytest.mark.parametrize("op", [o for o in cases.CASES if o != cases.RECOMPUTE_OP])
def test_the_device_oracle_judges_like_the_numpy_oracle(op, monkeypatch):
    """The torch float64 oracle (what a GPU run uses at large shapes) gives the reference backend the verdicts
    and nearly the error ratios of the NumPy oracle, forward and backward."""
    inputs = cases.make_inputs(op, (5,), 4, 24, torch.bfloat16, norm_weight=True)
    with mk.use_backend("reference"):
        numpy_fwd = cases.check_forward(mk, op, inputs)
        numpy_bwd = cases.check_backward(mk, op, inputs)
        monkeypatch.setenv(cases.ORACLE_ENV, "device")
        dev_fwd = cases.check_forward(mk, op, inputs)
        dev_bwd = cases.check_backward(mk, op, inputs)
    for a, b in zip(numpy_fwd + numpy_bwd, dev_fwd + dev_bwd):
        assert a.name == b.name and a.ok and b.ok, (a, b)
        assert abs(a.worst_ratio - b.worst_ratio) <= 0.05 + 0.05 * a.worst_ratio, (a, b)


@pytest.mark.parametrize("mode", ["numpy", "device"])
@pytest.mark.parametrize("op,index", [("post_pre", 0), ("post_pre", 1), ("mhc_pre", 0), ("post_pre_sp", 1)])
def test_a_wrong_output_fails_under_either_oracle(op, index, mode, monkeypatch):
    """A wrong output fails under both oracles -- post_pre's stored new residual included: its expectation and its
    working-precision slack come from a pass without the backend's stored values (with them, a wrong new residual
    was its own slack and passed at err/tol 0.25)."""
    monkeypatch.setenv(cases.ORACLE_ENV, mode)
    inputs = cases.make_inputs(op, (5,), 4, 24, torch.float32, norm_weight=True)
    with mk.use_backend("reference"):
        good = cases.check_forward(mk, op, inputs)
        res = cases.check_forward(_Perturbed(op, index), op, inputs)
    assert all(r.ok for r in good), good
    assert not res[index].ok, res


def test_the_device_oracle_checks_multilayer_recompute(monkeypatch):
    from mhc_kernels.recompute import multilayer_recompute

    monkeypatch.setenv(cases.ORACLE_ENV, "device")
    inputs = cases.make_recompute_inputs((6,), 4, 16, 3, torch.bfloat16)
    with mk.use_backend("reference"):
        res = cases.check_recompute(multilayer_recompute, inputs)
        bad = cases.check_recompute(lambda *a: tuple(o * 1.05 for o in multilayer_recompute(*a)), inputs)
    assert all(r.ok for r in res), res
    assert not all(r.ok for r in bad), bad
