"""The edges of autograd: double backward and forward-mode AD are refused with a clear error on every
public op and every path (eager fast path, torch.ops.mhc), never answered with a wrong number; plain
reverse mode keeps working inside and after the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import mhc_kernels as mk
from mhc_kernels import ops
from mhc_kernels.errors import MHCUnsupportedError
from mhc_kernels.reference import cases

DIFFERENTIABLE = [op for op, case in cases.CASES.items() if case.differentiable]  # (names of the inputs)


@pytest.fixture(params=[True, False], ids=["fast_path", "torch_ops"])
def path(request):
    was = ops.eager_fastpath_enabled()
    ops.set_eager_fastpath(request.param)
    yield request.param
    ops.set_eager_fastpath(was)


def _inputs(op, requires_grad):
    d = cases.make_inputs(op, (3,), 2, 8, torch.float64, norm_weight=True, seed=1)
    case = cases.CASES[op]
    return {k: (v.detach().clone().requires_grad_() if requires_grad and k in case.differentiable else v)
            for k, v in d.items()}


def _loss(op, d):
    outs = cases.CASES[op].run(mk, d)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return sum((o.double() * (1 + torch.arange(o.numel(), dtype=torch.float64).view_as(o) / o.numel())).sum()
               for o in outs if o.is_floating_point())


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_double_backward_is_refused(op, path):
    d = _inputs(op, True)
    leaves = [d[k] for k in cases.CASES[op].differentiable]
    with pytest.raises(MHCUnsupportedError, match="double backward"):
        torch.autograd.grad(_loss(op, d), leaves, create_graph=True)
    # the refusal leaves autograd usable: a plain backward of the same op still works
    grads = torch.autograd.grad(_loss(op, d), leaves)
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hessian_vector_product_is_refused_not_wrong(path):
    """The issue's case: an HVP through mhc_pre used to come out wrong by 0.14 on the fast path."""
    d = _inputs("mhc_pre", True)
    x = d["residual"]
    with pytest.raises(MHCUnsupportedError):
        (g,) = torch.autograd.grad(_loss("mhc_pre", d), x, create_graph=True)
        (g * torch.ones_like(g)).sum().backward()


@pytest.mark.parametrize("op", DIFFERENTIABLE)
def test_forward_mode_ad_is_refused(op, path):
    d = _inputs(op, False)
    primal_name = cases.CASES[op].differentiable[0]
    primal = d[primal_name]
    with fwAD.dual_level():
        dual = dict(d, **{primal_name: fwAD.make_dual(primal, torch.randn_like(primal))})
        with pytest.raises(MHCUnsupportedError, match="forward-mode AD"):
            cases.CASES[op].run(mk, dual)
    # outside the dual level the same call runs
    cases.CASES[op].run(mk, d)


@pytest.mark.parametrize("op", ["mhc_pre", "post", "sinkhorn"])
def test_torch_func_jvp_and_jacfwd_are_refused(op, path):
    d = _inputs(op, False)
    name = cases.CASES[op].differentiable[0]

    def f(t):
        outs = cases.CASES[op].run(mk, dict(d, **{name: t}))
        return outs[0] if isinstance(outs, tuple) else outs

    with pytest.raises(MHCUnsupportedError, match="forward-mode AD"):
        torch.func.jvp(f, (d[name],), (torch.randn_like(d[name]),))
    with pytest.raises(MHCUnsupportedError, match="forward-mode AD"):
        torch.func.jacfwd(f)(d[name])


@pytest.mark.parametrize("op", ["mhc_pre", "post"])
def test_torch_func_grad_works_but_grad_of_grad_is_refused(op):
    """One level of torch.func reverse mode (which always builds a graph) is first order and runs (on the fast
    path, whose autograd.Functions are functorch-ready); nesting two is a second derivative: refused."""
    d = _inputs(op, False)
    name = cases.CASES[op].differentiable[0]

    def loss(t):
        return _loss(op, dict(d, **{name: t}))

    g = torch.func.grad(loss)(d[name])
    leaf = d[name].detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss(leaf), leaf)
    torch.testing.assert_close(g, expected)
    with pytest.raises(MHCUnsupportedError, match="double backward"):
        torch.func.grad(lambda t: torch.func.grad(loss)(t).sum())(d[name])


def test_direct_torch_ops_call_under_forward_ad_is_refused():
    x = torch.randn(3, 2, 8, dtype=torch.float64)
    pre = torch.rand(3, 2, dtype=torch.float64)
    with fwAD.dual_level():
        with pytest.raises(MHCUnsupportedError):
            torch.ops.mhc.pre_apply_mix(fwAD.make_dual(x, torch.randn_like(x)), pre)
