"""mhc_kernels.nn: MHCSite / MHCExpand / MHCHead -- composition, initialisation, compile, autocast."""

import pytest
import torch
from torch import nn

import mhc_kernels as mk
from mhc_kernels.nn import MHCExpand, MHCHead, MHCSinglePassHead, MHCSite


def _mlp(C, dtype=torch.float32):
    return nn.Sequential(nn.RMSNorm(C, dtype=dtype), nn.Linear(C, 2 * C, dtype=dtype), nn.GELU(),
                         nn.Linear(2 * C, C, dtype=dtype))


def _perturb(site, seed=0):
    """Move the parameters away from the initialisation so the nonlinearities matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in site.parameters(recurse=False):
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("residual_mix", ["sinkhorn", "none"])
@pytest.mark.parametrize("norm_weight", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_site_equals_functional_composition(residual_mix, norm_weight, dtype):
    T, n, C = 6, 4, 16
    site = MHCSite(C, n, norm_weight=norm_weight, residual_mix=residual_mix, sublayer=_mlp(C, dtype))
    _perturb(site)
    x = torch.randn(2, T, n, C).to(dtype)

    def manual(x):
        if residual_mix == "sinkhorn":
            li, post_mix, comb_mix = mk.mhc_pre(x, site.fn, site.scale, site.base, norm_weight=site.norm_weight)
        else:  # the unconstrained ablation: same projection and pre/post mixes, raw residual matrix
            mixes = mk.norm_fn(x, site.fn, norm_weight=site.norm_weight)
            s = torch.cat([site.scale[0].expand(n), site.scale[1].expand(n), site.scale[2].expand(n * n)])
            z = torch.addcmul(site.base, mixes, s)  # z = mixes * s + base, computed as split_mixes computes it
            li = mk.pre_apply_mix(x, torch.sigmoid(z[..., :n]) + 1e-6)
            post_mix, comb_mix = torch.sigmoid(z[..., n:2 * n]) * 2.0, z[..., 2 * n:].unflatten(-1, (n, n))
        return mk.mhc_post(site.sublayer(li), x, post_mix, comb_mix)

    results = []
    for f in (site, manual):
        site.zero_grad()
        xl = x.clone().requires_grad_()
        out = f(xl)
        out.float().square().mean().backward()
        results.append([out.detach(), xl.grad] + [p.grad.clone() for p in site.parameters()])
    assert results[0][0].dtype == dtype and results[0][0].shape == x.shape
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_initialisation(n):
    """H_res ~ I (|H_res - I| <= identity_tol up to the 1% alpha perturbation), H_pre averages the
    streams, H_post ~ 1: at init the site is a plain pre-norm residual h + f(h)."""
    C, tol = 64, 1e-2
    site = MHCSite(C, n, identity_tol=tol)
    assert torch.allclose(site.scale.detach(), torch.full((3,), 0.01))
    h = torch.randn(32, C) * 3
    x = MHCExpand(n)(h)
    with torch.no_grad():
        li, post_mix, comb_mix, _ = site.pre(x)
        eye = torch.eye(n)
        dev = (comb_mix - eye).abs().max().item()
        assert dev <= 1.1 * tol, dev
        if n > 1:
            assert dev >= 0.5 * tol  # the stated tolerance is what the bias gives (not a saturated softmax)
        assert (post_mix - 1).abs().max() < 0.05
        assert torch.allclose(li, h, rtol=0.05, atol=0.05)  # average of identical streams
        f = _mlp(C)
        out = site(x, f)
        assert torch.isfinite(out).all()
        head = MHCHead(C, n)
        torch.testing.assert_close(head(out), h + f(h), rtol=0.05, atol=0.05 * (h + f(h)).abs().max().item())
        torch.testing.assert_close(head(x), h, rtol=0.02, atol=0.02)
    hc = MHCSite(C, n, residual_mix="none")
    with torch.no_grad():
        _, _, comb_raw, _ = hc.pre(x)
    assert (comb_raw - torch.eye(n)).abs().max() < 0.1  # raw identity + 1% perturbation


def test_sublayer_argument_and_errors():
    C, n = 8, 2
    site = MHCSite(C, n)
    x = torch.randn(3, n, C)
    with pytest.raises(ValueError, match="no sublayer"):
        site(x)
    assert site(x, nn.Identity()).shape == x.shape
    with pytest.raises(ValueError, match="residual_mix"):
        MHCSite(C, n, residual_mix="softmax")
    with pytest.raises(mk.MHCInputError):
        site(torch.randn(3, n, C + 1), nn.Identity())
    assert "residual_mix='sinkhorn'" in repr(site)


class TwoLayer(nn.Module):
    def __init__(self, C=32, n=4, vocab=50):
        super().__init__()
        self.embed = nn.Embedding(vocab, C)
        self.expand = MHCExpand(n)
        self.sites = nn.ModuleList([MHCSite(C, n, sublayer=_mlp(C)), MHCSite(C, n, sublayer=_mlp(C))])
        self.head = MHCHead(C, n)
        self.out = nn.Linear(C, vocab)

    def forward(self, tokens):
        x = self.expand(self.embed(tokens))
        for s in self.sites:
            x = s(x)
        return self.out(self.head(x))


def test_torch_compile_fullgraph_two_layer_model():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = TwoLayer()
    for s in model.sites:
        _perturb(s)
    tokens = torch.randint(0, 50, (2, 5))

    def step(f):
        model.zero_grad()
        loss = nn.functional.cross_entropy(f(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16(residual_dtype):
    """Under CPU autocast the sublayers run in bf16 but the mHC math stays float32 (autocast off)."""
    torch.manual_seed(0)
    C, n = 32, 4
    model = TwoLayer(C, n)
    for s in model.sites:
        _perturb(s)
    tokens = torch.randint(0, 50, (3, 4))
    h = model.embed(tokens).detach().to(residual_dtype)
    x = model.expand(h)
    assert x.dtype == residual_dtype

    def run(autocast):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = x
            for s in model.sites:
                y = s(y)
            out = model.head(y)
        out.float().square().mean().backward()
        return y, out, [p.grad for p in model.sites.parameters()]

    y, out, grads = run(True)
    assert y.dtype == residual_dtype and out.dtype == residual_dtype
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    if residual_dtype == torch.float32:  # (float32 sublayers cannot take a bf16 input without autocast)
        y0, out0, _ = run(False)
        torch.testing.assert_close(out.float(), out0.float(), rtol=0.05, atol=0.05)
    # the mHC ops themselves are not autocast: the mixes match a float32 run exactly
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.sites[0].pre(x)
    with torch.no_grad():
        plain = model.sites[0].pre(x)
    for a, b in zip(mixed, plain):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_low_precision_casts_keep_float32_master_parameters():
    """model.bfloat16() / .half() / .to(bf16) cast the sublayers; the mHC parameters stay float32 (the master
    copy mixed-precision training keeps), as the module docstring says; .double() is honoured (float64 mode)."""
    C, n = 16, 2
    for cast in (lambda m: m.bfloat16(), lambda m: m.half(), lambda m: m.to(torch.bfloat16)):
        site = cast(MHCSite(C, n, sublayer=_mlp(C, torch.float32)))
        head = cast(MHCHead(C, n))
        for name, p in list(site.named_parameters(recurse=False)) + list(head.named_parameters()):
            assert p.dtype == torch.float32, name
        assert all(p.dtype != torch.float32 for p in site.sublayer.parameters())
    site = MHCSite(C, n, sublayer=_mlp(C, torch.bfloat16)).bfloat16()
    head = MHCHead(C, n).bfloat16()
    x = torch.randn(4, n, C, dtype=torch.bfloat16)
    out = head(site(x))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and site.fn.grad is not None and site.fn.grad.dtype == torch.float32
    assert MHCSite(C, n).double().fn.dtype == torch.float64


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=0, n=4), "'hidden' .* must be >= 1"),
    (dict(hidden=8, n=-1), "'n' .* must be >= 1"),
    (dict(hidden=8.5, n=4), "'hidden' .* must be an int"),
    (dict(hidden=8, n=4, sinkhorn_iters=0), "'sinkhorn_iters' .* must be >= 1"),
    (dict(hidden=8, n=4, sinkhorn_iters=10 ** 9), "'sinkhorn_iters' must be <= 1000"),
    (dict(hidden=8, n=4, norm_eps=0.0), "'norm_eps' must be > 0"),
    (dict(hidden=8, n=4, sinkhorn_eps=-1e-6), "'sinkhorn_eps' must be > 0"),
    (dict(hidden=8, n=4, post_mult=0.0), "'post_mult' must be > 0"),
    (dict(hidden=8, n=4, pre_eps=-1.0), "'pre_eps' must be >= 0"),
    (dict(hidden=8, n=4, alpha=float("nan")), "alpha must be finite"),
])
def test_modules_validate_their_arguments_at_construction(kwargs, match):
    hidden, n = kwargs.pop("hidden"), kwargs.pop("n")
    with pytest.raises(mk.MHCInputError, match=f"MHCSite: .*{match}"):
        MHCSite(hidden, n, **kwargs)
    head_kwargs = {k: v for k, v in kwargs.items() if k in ("norm_eps", "pre_eps", "alpha")}
    if head_kwargs or not kwargs:
        with pytest.raises(mk.MHCInputError, match=f"MHCHead: .*{match}"):
            MHCHead(hidden, n, **head_kwargs)


def test_expand_validates_n():
    with pytest.raises(mk.MHCInputError, match="MHCExpand: argument 'n'"):
        MHCExpand(0)


def test_a_residual_of_the_wrong_shape_names_the_expected_shape_and_mhcexpand():
    C, n = 8, 4
    site, head = MHCSite(C, n, sublayer=nn.Identity()), MHCHead(C, n)
    embedding = torch.randn(2, 5, C)   # forgot MHCExpand
    with pytest.raises(mk.MHCInputError, match=r"MHCSite: the residual must have shape \(\.\.\., n=4, C=8\); got "
                                               r"\(2, 5, 8\) -- did you call MHCExpand first"):
        site(embedding)
    with pytest.raises(mk.MHCInputError, match="MHCHead: .*did you call MHCExpand first"):
        head(embedding)
    with pytest.raises(mk.MHCInputError, match=r"got \(2, 3, 4, 9\)$"):   # wrong C: no MHCExpand hint
        site(torch.randn(2, 3, 4, 9))
    assert site(MHCExpand(n)(embedding)).shape == (2, 5, n, C)


def test_float64_residual_for_gradcheck():
    C, n = 3, 2
    site = MHCSite(C, n, sublayer=nn.Linear(C, C, dtype=torch.float64))
    _perturb(site)
    x = torch.randn(2, n, C, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: site(t), (x,), eps=1e-6, atol=1e-6)


# -- single-pass (DeepSeek-V4.1) stack -------------------------------------------------------------------------
class _AttentionLike(nn.Module):
    """Token mixing over the sequence (a causal running mean) followed by a projection: attention's shape."""

    def __init__(self, C):
        super().__init__()
        self.proj = nn.Linear(C, C)

    def forward(self, h):
        steps = torch.arange(1, h.shape[-2] + 1, device=h.device, dtype=h.dtype).unsqueeze(-1)
        return self.proj(h.cumsum(-2) / steps)


def _single_pass_model(C, n, layers=2):
    sites = []
    for _ in range(layers):
        sites.append(MHCSite(C, n, sublayer=_AttentionLike(C), single_pass=True, sublayer_norm=True,
                             norm_eps=1e-20, out_norm_eps=1e-20))
        sites.append(MHCSite(C, n, sublayer=_mlp(C, torch.float32)[1:], single_pass=True, sublayer_norm=True,
                             norm_eps=1e-20, out_norm_eps=1e-20))
    return nn.Sequential(MHCExpand(n, single_pass=True), *sites, MHCSinglePassHead(C, n, out_norm_eps=1e-20))


def test_single_pass_stack_matches_the_functional_chain_and_trains():
    """MHCExpand(single_pass) -> 4 single-pass sites (attention-like, MLP) -> MHCSinglePassHead equals the chain
    written with the functional ops, and a few SGD steps reduce the loss."""
    C, n = 16, 4
    torch.manual_seed(0)
    model = _single_pass_model(C, n)
    tokens, target = torch.randn(2, 6, C), torch.randn(2, 6, C)
    x, pre = mk.expand(tokens, n), None
    for site in list(model)[1:-1]:
        li, pre_new, post, comb = mk.mhc_pre_sp(x, pre, site.fn, site.scale, site.base, norm_weight=site.norm_weight,
                                                out_norm_weight=site.out_norm_weight, **mk.V41)
        x, pre = mk.mhc_post(site.sublayer(li), x, post, comb), pre_new
    by_hand = mk.mhc_head_sp(x, pre, out_norm_weight=list(model)[-1].norm_weight, out_norm_eps=1e-20)
    torch.testing.assert_close(model(tokens), by_hand)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (model(tokens) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())


def test_single_pass_site_refuses_a_plain_residual_and_the_head_needs_a_pre():
    C, n = 8, 2
    site = MHCSite(C, n, sublayer=nn.Identity(), single_pass=True)
    with pytest.raises(mk.MHCInputError, match=r"takes the chain state \(residual, pre\)"):
        site(torch.randn(3, n, C))
    with pytest.raises(mk.MHCInputError, match="no pre yet"):
        MHCSinglePassHead(C, n)((torch.randn(3, n, C), None))
    with pytest.raises(mk.MHCInputError, match="sublayer_norm=True needs single_pass=True"):
        MHCSite(C, n, sublayer_norm=True)


@pytest.mark.slow
def test_single_pass_stack_trains_under_torch_compile_fullgraph():
    C, n = 16, 4
    torch.manual_seed(1)
    model = _single_pass_model(C, n, layers=2)
    tokens = torch.randn(2, 6, C)
    eager = model(tokens)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(tokens)
    torch.testing.assert_close(out, eager)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
