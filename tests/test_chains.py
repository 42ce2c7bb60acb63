"""Chains of ops under autograd, large and odd shapes, and exactness pins, on every backend that runs on CPU.

The per-op tests call one op at a time; a model chains them, and that is where a backend that touches
its inputs' storage (the TileLang emulator once did: every argument was copied back after a launch, which
bumped the autograd version of tensors an earlier op had saved) or drops a gradient path fails. Every
test here runs on the reference, on the Triton kernels under the Triton interpreter and on the TileLang
kernels under the CPU emulator (``MHC_TILELANG_EMULATE=1``), and compares with the float64 truth: the
same model evaluated in float64 on the reference backend (itself checked against the NumPy oracle and by
gradcheck in ``test_reference_numerics.py``).

Rounding on the Triton interpreter: it converts float32 to bf16 by truncation where a GPU rounds to
nearest, so a stored bf16 value may be one ulp further from the truth; the per-dtype tolerances of
``reference/cases.py`` allow a little over one bf16 ulp for that reason, and the chains here use
float32 so their comparisons are about the math, not the last rounding. The exactness pins use values
that are exact in every dtype, which truncation and rounding store alike.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from backends import BACKENDS

import mhc_kernels as mk
from mhc_kernels.nn import MHCExpand, MHCHead, MHCSite
from mhc_kernels.reference import cases


def _parametrize_backend():
    return pytest.mark.parametrize("backend", BACKENDS, indirect=True)


def _assert_close(name, got, truth, dtype=torch.float32, factor=1.0):
    err, ratio, idx, why = cases.error_ratio(got, truth, dtype, factor=factor)
    assert not why and ratio <= 1.0, f"{name}: max err {err:.3g}, worst err/tol {ratio:.3g} at {idx} {why}"


class CastLinear(torch.nn.Module):
    """A linear sublayer that runs in its input's dtype (float32 here, float64 for the truth)."""

    def __init__(self, C, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(C, C, generator=g) / C ** 0.5)

    def forward(self, h):
        return torch.tanh(F.linear(h, self.weight.to(h.dtype)))


def _model(n, C, sites, seed=0):
    torch.manual_seed(seed)
    layers = [MHCSite(C, n, sublayer=CastLinear(C, seed + 1 + i)) for i in range(sites)]
    with torch.no_grad():  # non-trivial gains so every gate and the Sinkhorn matter
        for s in layers:
            s.scale.copy_(torch.tensor([0.6, 0.4, 0.8]))
            s.norm_weight.mul_(1 + 0.2 * torch.randn_like(s.norm_weight))
    return torch.nn.Sequential(MHCExpand(n), *layers, MHCHead(C, n))


def _run(model, tokens, backend_name, dtype):
    model.zero_grad(set_to_none=True)
    x = tokens.detach().to(dtype).clone().requires_grad_()
    with mk.use_backend(backend_name):
        out = model(x)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=dtype)).square().sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


@_parametrize_backend()
@pytest.mark.parametrize("sites", [1, 2])
def test_model_of_sites_forward_and_backward_match_float64(backend, sites):
    """expand -> MHCSite x sites (mhc_pre -> sublayer -> mhc_post) -> MHCHead, trained one step: the output,
    the input gradient and every parameter gradient against the float64 reference."""
    n, C = 4, 24
    model = _model(n, C, sites)
    tokens = torch.randn(5, C)
    out, d_tokens, grads = _run(model, tokens, backend, torch.float32)
    out64, d_tokens64, grads64 = _run(model, tokens, "reference", torch.float64)
    _assert_close("output", out, out64)
    _assert_close("d_tokens", d_tokens, d_tokens64)
    assert grads.keys() == grads64.keys() and len(grads) == 5 * sites + 4
    for name in grads:
        _assert_close(f"d_{name}", grads[name], grads64[name], factor=4.0)  # sums over tokens, twice chained


@_parametrize_backend()
@pytest.mark.parametrize("reaches_loss", ["layer_input", "post_mix", "comb_mix"])
def test_backward_when_only_one_output_of_mhc_pre_reaches_the_loss(backend, reaches_loss):
    """The other outputs' gradients arrive as None (or zeros): the backward must still be right."""
    n, C = 4, 24
    d = cases.make_inputs("mhc_pre", (6,), n, C, torch.float32, norm_weight=True, seed=4)
    names = ("residual", "fn", "scale", "base", "norm_weight")

    def grads(dtype, backend_name):
        leaves = {k: d[k].detach().to(dtype).clone().requires_grad_() for k in names}
        with mk.use_backend(backend_name):
            outs = dict(zip(("layer_input", "post_mix", "comb_mix"),
                            mk.mhc_pre(*(leaves[k] for k in names[:4]), norm_weight=leaves["norm_weight"])))
            # random weights: with structured ones (e.g. a ramp over (i, j)) the Sinkhorn's unit column sums
            # make the comb_mix gradient vanish, and nothing would be tested
            w = torch.rand(outs[reaches_loss].shape, generator=torch.Generator().manual_seed(9)).to(dtype)
            (outs[reaches_loss] * w).sum().backward()
        return {k: v.grad for k, v in leaves.items()}

    got, truth = grads(torch.float32, backend), grads(torch.float64, "reference")
    for k in names:
        assert got[k] is not None, f"no gradient for {k}"
        _assert_close(f"d_{k}", got[k], truth[k])


# -- large and odd widths, few tokens (split-K over K up to 65536, masked tails) -----------------------------
# 1280 and 7680 (many blocks, no split remainder; on the reference only: the CPU-run kernels see the same code
# paths at 16384), 5129 (odd: scalar accesses, masked tails everywhere), 16384 (K = 65536, the widest split-K)
WIDE = [1280, 5129, 7680, 16384]
REFERENCE_ONLY_WIDTHS = (1280, 7680)


@_parametrize_backend()
@pytest.mark.parametrize("C", WIDE)
@pytest.mark.parametrize("op", ["mhc_pre", "post"])
def test_large_and_odd_hidden_widths(backend, op, C):
    if backend != "reference" and C in REFERENCE_ONLY_WIDTHS:
        pytest.skip("on the reference only (the CPU-run kernels see the same code paths at C=16384)")
    inputs = cases.make_inputs(op, (2,), 4, C, torch.bfloat16, norm_weight=True, seed=C)
    with mk.use_backend(backend):
        results = cases.check_forward(mk, op, inputs) + cases.check_backward(mk, op, inputs)
    bad = [r for r in results if not r.ok]
    assert not bad, "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


def test_many_tokens_tiny_width_on_the_reference():
    """65537 tokens (one more than a power of two) of C = 65: the parameter gradients are sums over them."""
    inputs = cases.make_inputs("mhc_pre", (65537,), 4, 65, torch.bfloat16, norm_weight=True, seed=1)
    with mk.use_backend("reference"):
        results = cases.check_forward(mk, "mhc_pre", inputs) + cases.check_backward(mk, "mhc_pre", inputs)
    bad = [r for r in results if not r.ok]
    assert not bad, "; ".join(f"{r.name}: ratio {r.worst_ratio:.3g} ({r.detail})" for r in bad)


# -- exactness pins -------------------------------------------------------------------------------------------
@_parametrize_backend()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_one_hot_pre_mix_copies_a_stream_bit_for_bit_and_cancelling_streams_give_zeros(backend, dtype):
    T, n, C = 5, 4, 40
    x = torch.randn(T, n, C).to(dtype)
    one_hot = torch.zeros(T, n)
    one_hot[torch.arange(T), torch.arange(T) % n] = 1.0
    twin = x.clone()
    twin[:, 1] = x[:, 0]
    cancel = torch.tensor([1.0, -1.0, 0.0, 0.0]).expand(T, n).contiguous()
    with mk.use_backend(backend):
        picked = mk.pre_apply_mix(x, one_hot)
        zeros = mk.pre_apply_mix(twin, cancel)
        # post with comb = identity and post_mix = 0 copies the residual; with y = 0 the same
        copied = mk.mhc_post(torch.zeros(T, C, dtype=dtype), x, torch.zeros(T, n), torch.eye(n).expand(T, n, n))
    assert torch.equal(picked, x[torch.arange(T), torch.arange(T) % n])
    assert torch.equal(zeros, torch.zeros_like(zeros))
    assert torch.equal(copied, x)


@_parametrize_backend()
def test_strided_residual_and_column_major_mixes_give_the_contiguous_results(backend):
    T, n, C = 6, 4, 24
    big = torch.randn(T, n, 2 * C).bfloat16()
    x = big[..., ::2]                       # strided along C
    pre = torch.rand(n, T).t()              # column-major (T, n)
    post = torch.rand(n, T).t()
    comb = torch.rand(n, n, T).permute(2, 0, 1)
    y = torch.randn(C, T).bfloat16().t()
    with mk.use_backend(backend):
        a = (mk.pre_apply_mix(x, pre), mk.mhc_post(y, x, post, comb))
        b = (mk.pre_apply_mix(x.contiguous(), pre.contiguous()),
             mk.mhc_post(y.contiguous(), x.contiguous(), post.contiguous(), comb.contiguous()))
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@_parametrize_backend()
def test_tiny_norm_eps_with_an_all_zero_token_stays_finite(backend):
    """rstd = rsqrt(0 + 1e-20) = 1e10 for the zero token: its mixes are 0 and every gradient finite."""
    n, C = 4, 24
    d = cases.make_inputs("mhc_pre", (3,), n, C, torch.float32, norm_weight=True, seed=2)
    x = d["residual"].clone()
    x[1] = 0.0
    x.requires_grad_()
    fn, scale, base = (d[k].clone().requires_grad_() for k in ("fn", "scale", "base"))
    with mk.use_backend(backend):
        li, post, comb = mk.mhc_pre(x, fn, scale, base, norm_eps=1e-20)
        (li.sum() + post.sum() + comb.square().sum()).backward()
    for name, t in [("layer_input", li), ("post_mix", post), ("comb_mix", comb), ("d_residual", x.grad),
                    ("d_fn", fn.grad), ("d_scale", scale.grad), ("d_base", base.grad)]:
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert torch.equal(li[1], torch.zeros_like(li[1]))


@_parametrize_backend()
def test_norm_fn_takes_a_projection_with_any_row_count(backend):
    """As the docstring says (and mhc_head needs: n rows): fn (rows, n*C) with rows other than n*(n+2)."""
    n, C, rows = 4, 24, 5
    d = cases.make_inputs("norm_fn", (7,), n, C, torch.float32, norm_weight=True, seed=5)
    fn = torch.randn(rows, n * C) / (n * C) ** 0.5
    with mk.use_backend(backend):
        got = mk.norm_fn(d["residual"], fn, norm_weight=d["norm_weight"])
    truth = mk.norm_fn(d["residual"].double(), fn.double(), norm_weight=d["norm_weight"].double())
    assert got.shape == (7, rows)
    _assert_close("mixes", got, truth)
