"""contract §8 multi-layer recompute: the operator and the training helper (gradients, saved bytes)."""

import math

import pytest
import torch
from torch import nn

import mhc_kernels as mk
from mhc_kernels import recompute
from mhc_kernels.nn import MHCExpand, MHCHead, MHCSinglePassHead, MHCSite
from mhc_kernels.reference import cases


# -- block size rule -------------------------------------------------------------------------------
def test_default_block_size_follows_the_paper_rule():
    assert recompute.default_block_size(12, 4) == 3
    assert recompute.default_block_size(24, 4) == 4
    assert recompute.default_block_size(1, 4) == 1
    for n in (1, 2, 4, 8):
        for L in range(1, 80):
            b = recompute.default_block_size(L, n)
            assert abs(b - math.sqrt(n * L / (n + 2))) <= 1.5, (L, n, b)
            cost = lambda r: n * math.ceil(L / r) + (n + 2) * r  # noqa: E731
            assert cost(b) == min(cost(r) for r in range(1, L + 1))


# -- the operator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("lead,n,C,L", [((5,), 4, 64, 3), ((2, 3), 2, 7, 1), ((0,), 4, 8, 2), ((), 4, 16, 5)])
def test_multilayer_recompute_matches_oracle(dtype, lead, n, C, L):
    inputs = cases.make_recompute_inputs(lead, n, C, L, dtype)
    res = cases.check_recompute(recompute.multilayer_recompute, inputs)
    assert all(r.ok for r in res), [r for r in res if not r.ok]


def test_multilayer_recompute_is_bit_identical_to_the_site_ops():
    """What the helper relies on: the rebuilt residuals are exactly the forward's."""
    d = cases.make_recompute_inputs((7,), 4, 32, 4, torch.bfloat16)
    residuals, inputs = recompute.multilayer_recompute(d["residual"], d["layer_outputs"], d["pre_mix"],
                                                       d["post_mix"], d["comb_mix"])
    x = d["residual"]
    for layer in range(4):
        assert torch.equal(residuals[layer], x)
        assert torch.equal(inputs[layer], mk.pre_apply_mix(x, d["pre_mix"][layer]))
        x = mk.mhc_post(d["layer_outputs"][layer], x, d["post_mix"][layer], d["comb_mix"][layer])


def test_multilayer_recompute_custom_op():
    d = cases.make_recompute_inputs((3,), 2, 5, 2, torch.float32)
    args = (d["residual"], d["layer_outputs"], d["pre_mix"], d["post_mix"], d["comb_mix"])
    torch.library.opcheck(torch.ops.mhc.multilayer_recompute, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    eager = recompute.multilayer_recompute(*args)
    compiled = torch.compile(recompute.multilayer_recompute, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_multilayer_recompute_validation():
    d = cases.make_recompute_inputs((3,), 2, 5, 2, torch.float32)
    args = [d["residual"], d["layer_outputs"], d["pre_mix"], d["post_mix"], d["comb_mix"]]
    bad = list(args)
    bad[2] = bad[2][:1]
    with pytest.raises(mk.MHCInputError, match="pre_mix"):
        recompute.multilayer_recompute(*bad)
    bad = list(args)
    bad[4] = bad[4].double()
    with pytest.raises(mk.MHCDtypeError, match="comb_mix"):
        recompute.multilayer_recompute(*bad)
    bad = list(args)
    bad[1] = bad[1].to(torch.bfloat16)
    with pytest.raises(mk.MHCDtypeError, match="layer_outputs"):
        recompute.multilayer_recompute(*bad)


# -- the training helper -----------------------------------------------------------------------------------
class Proj(nn.Module):
    """A sublayer that saves exactly its input (and its weight): y = x @ W."""

    def __init__(self, C, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.randn(C, C, dtype=dtype) / C ** 0.5)

    def forward(self, x):
        return x @ self.w


def _model(L, C, n, dtype, residual_mix="sinkhorn", sub="proj"):
    torch.manual_seed(0)
    make = (lambda: Proj(C, dtype)) if sub == "proj" else (
        lambda: nn.Sequential(nn.RMSNorm(C, dtype=dtype), nn.Linear(C, 2 * C, dtype=dtype), nn.GELU(),
                              nn.Linear(2 * C, C, dtype=dtype)))
    sites = nn.ModuleList([MHCSite(C, n, sublayer=make(), residual_mix=residual_mix) for _ in range(L)])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the initialisation, so every mix matters
        for s in sites:
            s.base.add_(torch.randn(s.base.shape, generator=g) * 0.5)
            s.scale.fill_(0.5)
    return sites


def _run(sites, head, h, *, enabled, block_size=None, count=None):
    """Expand -> checkpoint_sites -> head, forward and backward: (output, gradients, bytes saved for backward);
    single-pass sites run on the chain state."""
    sites.zero_grad()
    head.zero_grad()
    hl = h.detach().clone().requires_grad_()
    n = sites[0].n
    single_pass = bool(sites[0].single_pass)
    params = {p.untyped_storage().data_ptr() for p in list(sites.parameters()) + list(head.parameters())}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = recompute.checkpoint_sites(MHCExpand(n, single_pass=single_pass)(hl), sites, block_size=block_size,
                                       enabled=enabled)
    out = head(x)
    out.float().square().mean().backward()
    grads = [hl.grad] + [p.grad for p in sites.parameters()] + [p.grad for p in head.parameters()]
    return out.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual_mix", ["sinkhorn", "none"])
@pytest.mark.parametrize("block_size", [None, 1, 5, 12])
def test_recompute_gradients_equal_plain_path(dtype, residual_mix, block_size):
    L, C, n = 12, 16, 4
    sites = _model(L, C, n, dtype, residual_mix, sub="mlp")
    head = MHCHead(C, n)
    h = torch.randn(2, 3, C, dtype=dtype)
    out0, g0, _ = _run(sites, head, h, enabled=False)
    out1, g1, _ = _run(sites, head, h, enabled=True, block_size=block_size)
    rtol, atol = cases.TOLERANCES[dtype]
    torch.testing.assert_close(out1, out0, rtol=rtol, atol=atol)
    for a, b in zip(g1, g0):
        assert a is not None
        scale = b.abs().max().item() or 1.0
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


def test_recompute_saves_at_most_the_papers_budget(capsys):
    """12 sites, n=4, bf16: what the forward keeps for backward, and what backward rebuilds at once."""
    L, C, n, dtype = 12, 64, 4, torch.bfloat16
    T = 2 * 32
    sites = _model(L, C, n, dtype)
    head = MHCHead(C, n)
    h = torch.randn(2, 32, C, dtype=dtype)
    rebuilt = []
    orig = recompute.multilayer_recompute

    def spy(*args):
        out = orig(*args)
        rebuilt.append(sum(o.untyped_storage().nbytes() for o in out) + args[1].untyped_storage().nbytes())
        return out

    recompute.multilayer_recompute = spy
    try:
        _, g_plain, plain = _run(sites, head, h, enabled=False)
        _, g_rc, saved = _run(sites, head, h, enabled=True)
    finally:
        recompute.multilayer_recompute = orig
    for a, b in zip(g_rc, g_plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same values: the reference rebuilds bit-exactly
    budget = recompute.memory_budget(L, n, C, tokens=T, act_bytes=2)
    assert budget["block_size"] == 3 and len(rebuilt) == 4
    # the head saves the last residual (n*C per token); everything else is the sites'
    head_bytes = n * C * T * 2
    assert saved - head_bytes <= budget["saved_budget"], (saved, budget)
    assert max(rebuilt) <= budget["transient"], (rebuilt, budget)
    assert saved + max(rebuilt) - head_bytes <= budget["total_budget"]
    with capsys.disabled():
        print(f"\n[recompute] 12 sites, n={n}, C={C}, {T} tokens, bf16, block {budget['block_size']}: "
              f"saved for backward {(plain - head_bytes) / 1024:.0f} KiB plain -> {(saved - head_bytes) / 1024:.0f} "
              f"KiB recompute ({1 - (saved - head_bytes) / (plain - head_bytes):.0%} less; budget "
              f"{budget['saved_budget'] / 1024:.0f} KiB resident + {budget['transient'] / 1024:.0f} KiB transient, "
              f"rebuilt block {max(rebuilt) / 1024:.0f} KiB)")


def test_recompute_composes_with_outer_hooks_and_no_grad():
    L, C, n = 4, 8, 2
    sites = _model(L, C, n, torch.float32)
    x = torch.randn(3, n, C, requires_grad=True)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return ("outer", t)

    def unpack(p):
        unpacked.append(p)
        return p[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        y = recompute.checkpoint_sites(x, sites, block_size=2)
    y.sum().backward()
    assert packed and len(unpacked) == len(packed)
    with torch.no_grad():
        torch.testing.assert_close(recompute.checkpoint_sites(x, sites), y.detach(), rtol=0, atol=0)
    # (site, sublayer) pairs work too
    pairs = [(s, s.sublayer) for s in sites]
    torch.testing.assert_close(recompute.checkpoint_sites(x, pairs).detach(), y.detach(), rtol=0, atol=0)
    with pytest.raises(mk.MHCInputError, match="no sublayer"):
        recompute.checkpoint_sites(x, [MHCSite(C, n)])


# -- single-pass (DeepSeek-V4.1) blocks -----------------------------------------------------------------------
def _sp_model(L, C, n, dtype, sublayer_norm=True):
    torch.manual_seed(2)
    sites = nn.ModuleList([MHCSite(C, n, sublayer=Proj(C, dtype), single_pass=True, sublayer_norm=sublayer_norm)
                           for _ in range(L)])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in sites:
            s.base.add_(torch.randn(s.base.shape, generator=g) * 0.5)
            s.scale.fill_(0.5)
            if s.out_norm_weight is not None:
                s.out_norm_weight.add_(torch.randn(s.out_norm_weight.shape, generator=g) * 0.2)
    return sites


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sublayer_norm", [True, False])
@pytest.mark.parametrize("block_size", [None, 1, 5, 12])
def test_single_pass_recompute_gradients_equal_the_plain_path_bitwise(dtype, sublayer_norm, block_size):
    """Single-pass blocks rebuild their residuals and (normalised) layer inputs from x_0, the carried pre
    entering the block, the sublayer outputs and per site (pre, post, comb): on the reference the rebuilt
    values are the forward's, so gradients are bit for bit the plain path's."""
    L, C, n = 12, 16, 4
    sites = _sp_model(L, C, n, dtype, sublayer_norm)
    head = MHCSinglePassHead(C, n)
    h = torch.randn(2, 3, C, dtype=dtype)
    out0, g0, _ = _run(sites, head, h, enabled=False)
    out1, g1, _ = _run(sites, head, h, enabled=True, block_size=block_size)
    assert torch.equal(out1, out0)
    for a, b in zip(g1, g0):
        assert a is not None and torch.equal(a, b)


def test_single_pass_recompute_saves_less(capsys):
    """12 single-pass sites, n=4, bf16: bytes saved for backward, plain path vs recompute."""
    L, C, n, dtype = 12, 64, 4, torch.bfloat16
    T = 2 * 32
    sites = _sp_model(L, C, n, dtype)
    head = MHCSinglePassHead(C, n)
    h = torch.randn(2, 32, C, dtype=dtype)
    _, g_plain, plain = _run(sites, head, h, enabled=False)
    _, g_rc, saved = _run(sites, head, h, enabled=True)
    for a, b in zip(g_rc, g_plain):
        assert torch.equal(a, b)
    head_bytes = n * C * T * 2 + n * T * 4   # the head keeps the last residual and the last pre
    budget = recompute.memory_budget(L, n, C, tokens=T, act_bytes=2)
    assert saved - head_bytes <= budget["saved_budget"], (saved, budget)
    assert saved < 0.6 * plain
    with capsys.disabled():
        print(f"\n[recompute, single-pass] 12 sites, n={n}, C={C}, {T} tokens, bf16, block {budget['block_size']}: "
              f"saved for backward {(plain - head_bytes) / 1024:.0f} KiB plain -> {(saved - head_bytes) / 1024:.0f} "
              f"KiB recompute ({1 - (saved - head_bytes) / (plain - head_bytes):.0%} less)")


def test_checkpoint_sites_refuses_a_mixed_or_unstarted_single_pass_chain():
    C, n = 8, 2
    sp = MHCSite(C, n, sublayer=nn.Identity(), single_pass=True)
    two = MHCSite(C, n, sublayer=nn.Identity())
    x = torch.randn(3, n, C, requires_grad=True)
    with pytest.raises(mk.MHCInputError, match="mix single-pass and two-pass"):
        recompute.checkpoint_sites((x, None), [sp, two])
    with pytest.raises(mk.MHCInputError, match=r"chain state \(residual, pre\)"):
        recompute.checkpoint_sites(x, [sp])
