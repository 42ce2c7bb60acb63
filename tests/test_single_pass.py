"""Single-pass mHC (DeepSeek-V4.1, contract §14): what the per-op cases (``reference/cases.py``, run on every
backend by the backend test files) do not pin down -- the first site, the one-site shift, gradients across
a chain, tiny eps, the fused boundary against its parts, and bad input.

Every test that takes ``backend`` runs on the reference, the Triton kernels (interpreter) and the TileLang
kernels (CPU emulator): ``tests/backends.py`` and the ``backend`` fixture in ``conftest.py``.
"""

from __future__ import annotations

import pytest
import torch
from backends import BACKENDS

import mhc_kernels as mk
from mhc_kernels.reference import cases, oracle

_backend = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _site(n, C, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    m, K = n * (n + 2), n * C
    return dict(fn=(torch.randn(m, K, generator=g) / K ** 0.5).to(dtype),
                scale=torch.tensor([0.7, 0.5, 0.9], dtype=dtype),
                base=(torch.randn(m, generator=g) / 2).to(dtype),
                out_norm_weight=(1 + torch.randn(C, generator=g) / 4).to(dtype))


@_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_first_site_collapses_stream_zero_exactly(backend, dtype):
    n, C = 4, 24
    x = torch.randn(6, n, C).to(dtype)
    p = _site(n, C, 1)
    with mk.use_backend(backend):
        h, pre, post, comb = mk.mhc_pre_sp(x, None, p["fn"], p["scale"], p["base"])
        h_norm, *_ = mk.mhc_pre_sp(x, None, p["fn"], p["scale"], p["base"], out_norm_weight=p["out_norm_weight"])
        two_pass = mk.mhc_pre(x, p["fn"], p["scale"], p["base"])
    assert torch.equal(h, x[:, 0])
    want = oracle.collapse_norm(x, None, p["out_norm_weight"], 1e-6)
    assert cases.compare("normed stream 0", h_norm, want).ok
    # this site's coefficients are mhc_pre's from the same residual: bit for bit on the reference (the same
    # projection); the fused kernels read the residual once and sum K in column-chunk order, so to float32
    # accumulation error there
    if backend == "reference":
        assert torch.equal(post, two_pass[1]) and torch.equal(comb, two_pass[2])
    else:
        torch.testing.assert_close(post, two_pass[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(comb, two_pass[2], rtol=1e-5, atol=1e-6)


@_backend
def test_the_shift_a_sites_fn_changes_the_next_sites_input_not_its_own(backend):
    n, C = 4, 24
    x0 = torch.randn(5, n, C)
    s0, s1 = _site(n, C, 2), _site(n, C, 3)

    def chain(fn0):
        with mk.use_backend(backend):
            h0, pre0, post0, comb0 = mk.mhc_pre_sp(x0, None, fn0, s0["scale"], s0["base"])
            x1, h1, *_ = mk.post_pre_sp(torch.tanh(h0), x0, post0, comb0, pre0, s1["fn"], s1["scale"], s1["base"])
        return h0, h1

    h0, h1 = chain(s0["fn"])
    h0b, h1b = chain(s0["fn"] * 1.5 + 0.01)
    assert torch.equal(h0, h0b)             # site 0's input does not depend on site 0's coefficients
    assert not torch.allclose(h1, h1b)       # site 1's input is collapsed with site 0's pre


def _chain_3_sites(x0, fns, scale, base, w_out, w_final, consts):
    """3 single-pass sites (sublayer tanh) and the head, as a user writes it."""
    h, pre, post, comb = mk.mhc_pre_sp(x0, None, fns[0], scale, base, out_norm_weight=w_out, **consts)
    x = x0
    for fn in fns[1:]:
        x, h, pre, post, comb = mk.post_pre_sp(torch.tanh(h), x, post, comb, pre, fn, scale, base,
                                               out_norm_weight=w_out, **consts)
    x = mk.mhc_post(torch.tanh(h), x, post, comb)
    out_eps = consts.get("out_norm_eps", 1e-6)
    return mk.mhc_head_sp(x, pre, out_norm_weight=w_final, out_norm_eps=out_eps)


def test_gradcheck_float64_three_site_chain_with_head():
    """d prev_pre carries each site's gradient to the previous site's coefficient head: gradcheck of the
    whole chain in float64 (reference) with respect to the input, every fn, the gains and both norm weights."""
    n, C = 2, 3
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, n, C, generator=g, dtype=torch.float64, requires_grad=True)
    fns = [(torch.randn(n * (n + 2), n * C, generator=g, dtype=torch.float64) / 2).requires_grad_() for _ in range(3)]
    scale = torch.tensor([0.6, 0.4, 0.8], dtype=torch.float64, requires_grad=True)
    base = (torch.randn(n * (n + 2), generator=g, dtype=torch.float64) / 2).requires_grad_()
    w_out = (1 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    w_final = (1 + torch.rand(C, generator=g, dtype=torch.float64)).requires_grad_()
    consts = dict(sinkhorn_iters=4)

    def f(x0, f0, f1, f2, scale, base, w_out, w_final):
        return _chain_3_sites(x0, [f0, f1, f2], scale, base, w_out, w_final, consts)

    with mk.use_backend("reference"):
        assert torch.autograd.gradcheck(f, (x0, *fns, scale, base, w_out, w_final), eps=1e-6, atol=1e-6)
        # site 0's projection reaches the output only through the carried pre: its gradient is not zero
        f(x0, *fns, scale, base, w_out, w_final).sum().backward()
    assert fns[0].grad.abs().max() > 0


@_backend
def test_chain_matches_float64_on_every_backend(backend):
    n, C = 4, 24
    x0 = torch.randn(5, n, C)
    s = _site(n, C, 6)
    fns = [_site(n, C, 10 + i)["fn"] for i in range(3)]
    leaves = [t.clone().requires_grad_() for t in (x0, *fns, s["out_norm_weight"])]
    with mk.use_backend(backend):
        out = _chain_3_sites(leaves[0], leaves[1:4], s["scale"], s["base"], leaves[4], None, {})
        out.square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x0, *fns, s["out_norm_weight"])]
    with mk.use_backend("reference"):
        out64 = _chain_3_sites(ref[0], ref[1:4], s["scale"].double(), s["base"].double(), ref[4], None, {})
        out64.square().sum().backward()
    assert cases.compare("out", out, out64.detach()).ok
    for i, (a, b) in enumerate(zip(leaves, ref)):
        r = cases.compare(f"grad {i}", a.grad, b.grad, scale=float(b.grad.abs().max()) * 4)
        assert r.ok, (r.name, r.worst_ratio, r.detail)


@_backend
def test_v41_eps_with_zero_and_tiny_tokens_stays_finite(backend):
    n, C = 4, 24
    x = torch.randn(4, n, C)
    x[1] = 0.0
    x[2] *= 1e-12
    s = _site(n, C, 7)
    leaves = {k: v.clone().requires_grad_() for k, v in dict(x=x, **s).items()}
    prev = torch.rand(4, n, requires_grad=True)
    with mk.use_backend(backend):
        h, pre, post, comb = mk.mhc_pre_sp(leaves["x"], prev, leaves["fn"], leaves["scale"], leaves["base"],
                                           out_norm_weight=leaves["out_norm_weight"], **mk.V41)
        (h.sum() + pre.sum() + post.sum() + comb.square().sum()).backward()
    for name, t in [("layer_input", h), ("pre", pre), ("post", post), ("comb", comb), ("d_prev_pre", prev.grad)] + \
            [(f"d_{k}", v.grad) for k, v in leaves.items()]:
        assert t is not None and torch.isfinite(t).all(), name
    assert torch.equal(h[1], torch.zeros_like(h[1]))


@_backend
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_post_pre_sp_equals_post_then_mhc_pre_sp(backend, dtype):
    n, C = 4, 24
    d = cases.make_inputs("post_pre_sp", (7,), n, C, dtype, norm_weight=True, seed=8)
    kw = dict(norm_weight=d["norm_weight"], out_norm_weight=d["out_norm_weight"])
    with mk.use_backend(backend):
        fused = mk.post_pre_sp(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"], d["prev_pre"],
                               d["fn"], d["scale"], d["base"], **kw)
        new = mk.mhc_post(d["layer_output"], d["residual"], d["post_mix"], d["comb_mix"])
        parts = (new,) + mk.mhc_pre_sp(new, d["prev_pre"], d["fn"], d["scale"], d["base"], **kw)
    assert torch.equal(fused[0], parts[0])
    for a, b in zip(fused[1:], parts[1:]):
        torch.testing.assert_close(a, b, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)


def test_mean_head_and_the_v41_preset():
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(mk.mhc_head_sp(x, mean=True), x.mean(-2))
    assert mk.V41 == dict(norm_eps=1e-20, out_norm_eps=1e-20, pre_eps=1e-6, sinkhorn_eps=1e-6, post_mult=2.0,
                          sinkhorn_iters=20)
    with pytest.raises(mk.MHCInputError, match="pre is required"):
        mk.mhc_head_sp(x)
    with pytest.raises(mk.MHCInputError, match="not both"):
        mk.mhc_head_sp(x, torch.rand(3, 4), mean=True)


def test_out_norm_weight_in_the_residual_dtype_is_accepted_and_gets_its_gradient_in_that_dtype():
    n, C = 2, 8
    x = torch.randn(3, n, C, dtype=torch.bfloat16)
    s = _site(n, C, 9)
    w = s["out_norm_weight"].bfloat16().requires_grad_()
    h, *_ = mk.mhc_pre_sp(x, torch.rand(3, n), s["fn"], s["scale"], s["base"], out_norm_weight=w)
    h.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bad,match", [
    (dict(prev_pre=torch.rand(3, 3)), "'prev_pre' must have shape"),
    (dict(prev_pre=torch.rand(3, 2).double()), "'prev_pre'"),
    (dict(out_norm_weight=torch.ones(7)), "'out_norm_weight' must have shape"),
    (dict(out_norm_eps=0.0), "'out_norm_eps' must be > 0"),
    (dict(norm_eps=-1.0), "'norm_eps' must be > 0"),
])
def test_bad_input_gets_the_specific_errors(bad, match):
    n, C = 2, 8
    s = _site(n, C, 4)
    kw = dict(prev_pre=torch.rand(3, n), out_norm_weight=s["out_norm_weight"])
    kw.update(bad)
    prev = kw.pop("prev_pre")
    with pytest.raises(mk.MHCInputError, match=match):
        mk.mhc_pre_sp(torch.randn(3, n, C), prev, s["fn"], s["scale"], s["base"], **kw)
