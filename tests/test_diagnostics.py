"""mhc_kernels.diagnostics: composite mappings, Amax gain, doubly-stochastic deviation, hooks."""

import itertools

import pytest
import torch
from torch import nn

from mhc_kernels import diagnostics as dg
from mhc_kernels.nn import MHCExpand, MHCHead, MHCSite


def _doubly_stochastic(n, tokens, gen):
    """Exact doubly stochastic matrices: convex combinations of permutation matrices (Birkhoff)."""
    perms = torch.stack([torch.eye(n, dtype=torch.float64)[list(p)] for p in itertools.permutations(range(n))])
    w = torch.rand(tokens, perms.shape[0], generator=gen, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    return torch.einsum("tp,pij->tij", w, perms)


def test_identity_has_gain_one():
    mats = [torch.eye(4).expand(5, 4, 4) for _ in range(10)]
    rep = dg.analyze(mats)
    for row in rep.layers:
        for g in (row.single, row.composite):
            assert g.forward_max == g.forward_mean == g.backward_max == g.backward_mean == 1.0
        assert row.ds_deviation_max == 0.0


def test_doubly_stochastic_product_has_gain_one():
    gen = torch.Generator().manual_seed(0)
    mats = [_doubly_stochastic(4, 7, gen) for _ in range(30)]
    P = dg.composite(mats)
    assert float(dg.doubly_stochastic_deviation(P).max()) < 1e-12  # the Birkhoff polytope is closed under products
    f, b = dg.amax_gain(P)
    torch.testing.assert_close(f, torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(b, torch.ones(7, dtype=torch.float64))
    rep = dg.analyze(mats)
    assert abs(rep.final.forward_max - 1) < 1e-12 and abs(rep.worst.backward_max - 1) < 1e-12


@pytest.mark.parametrize("layout", ["H", "comb"])
def test_unconstrained_row_sums_compound(layout):
    """Row sums 1.5 in every layer (x_{l+1} = H x_l) -> forward gain 1.5^L of the composite."""
    gen = torch.Generator().manual_seed(1)
    L, n = 8, 4
    Hs = []
    for _ in range(L):
        R = torch.rand(3, n, n, generator=gen, dtype=torch.float64)
        Hs.append(1.5 * R / R.sum(-1, keepdim=True))  # positive, every row sums to 1.5
    mats = Hs if layout == "H" else [H.transpose(-1, -2) for H in Hs]
    rep = dg.analyze(mats, layout=layout)
    for i, row in enumerate(rep.layers):
        assert row.single.forward_max == pytest.approx(1.5)
        assert row.composite.forward_max == pytest.approx(1.5 ** (i + 1))
        assert row.composite.forward_mean == pytest.approx(1.5 ** (i + 1))
        assert row.ds_deviation_max >= 0.5 - 1e-12
    assert rep.final.forward_max == pytest.approx(1.5 ** L)
    # column sums average to 1.5 too, so the backward gain is at least that
    assert rep.final.backward_max >= 1.5 ** L - 1e-9


def test_amax_gain_uses_absolute_values_and_both_directions():
    H = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    f, b = dg.amax_gain(H)
    assert float(f) == 3.0 and float(b) == 2.0  # rows |1|+|-2|, |0.5|; columns 1.5, 2
    assert float(dg.doubly_stochastic_deviation(H)) == 3.0  # column 1 sums to -2: |-2 - 1|


def test_composite_order_and_layout():
    A = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    B = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(dg.composite([A, B], layout="H"), (B @ A).double())
    torch.testing.assert_close(dg.composite([A.T, B.T], layout="comb"), (B @ A).double())
    with pytest.raises(ValueError):
        dg.composite([])


def test_hooks_collect_from_sites():
    C, n = 16, 4
    model = nn.ModuleDict({
        "expand": MHCExpand(n),
        "a": MHCSite(C, n, sublayer=nn.Linear(C, C)),
        "b": MHCSite(C, n, sublayer=nn.Linear(C, C), residual_mix="none"),
        "head": MHCHead(C, n),
    })

    def forward(h):
        x = model["expand"](h)
        x = model["b"](model["a"](x))
        return model["head"](x)

    h = torch.randn(2, 3, C)
    with dg.collect(model) as rec:
        forward(h)
    assert rec.names == ["a", "b"] and len(rec.comb_mixes) == 2
    assert rec.comb_mixes[0].shape == (2, 3, n, n) and not rec.comb_mixes[0].requires_grad
    rep = rec.report()
    assert [r.name for r in rep.layers] == ["a", "b"]
    # mHC at init: doubly stochastic (column sums exact, rows within Sinkhorn's convergence)
    assert rep.layers[0].ds_deviation_max < 1e-3
    assert abs(rep.layers[0].single.forward_max - 1) < 1e-5
    assert rep.as_dict()["final"]["forward_max"] == rep.final.forward_max
    n_before = len(rec.comb_mixes)
    forward(h)  # hooks are gone after the with block
    assert len(rec.comb_mixes) == n_before
    with pytest.raises(ValueError, match="no residual mixes"):
        dg.collect(nn.Linear(2, 2)).report()


def test_trained_like_mhc_stays_bounded_but_hc_does_not():
    """Random (non-identity) residual logits: Sinkhorn keeps the composite gain ~1, the raw matrix does not."""
    torch.manual_seed(0)
    C, n, L = 16, 4, 12
    sites = {}
    for mix in ("sinkhorn", "none"):
        ss = [MHCSite(C, n, residual_mix=mix, sublayer=nn.Identity()) for _ in range(L)]
        with torch.no_grad():
            for s in ss:
                s.base[2 * n:].add_(torch.randn(n * n) * 0.3)
        sites[mix] = ss
    x = MHCExpand(n)(torch.randn(8, C))
    gains = {}
    for mix, ss in sites.items():
        container = nn.ModuleList(ss)
        with torch.no_grad(), dg.collect(container) as rec:
            y = x
            for s in ss:
                y = s(y)
        gains[mix] = rec.report().worst
    assert gains["sinkhorn"].forward_max < 1 + 1e-5 and gains["sinkhorn"].backward_max < 1.05
    assert gains["none"].forward_max > 2.0
