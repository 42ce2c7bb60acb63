"""Stability diagnostics of the residual mixing: composite mappings and the Amax gain.

The residual of an mHC/HC model evolves, per token, as ``x_{l+1} = H_l x_l + (sublayer
terms)`` with ``H_l`` the ``n x n`` residual mix of site ``l``. Across sites the residual
path is the composite ``P_l = H_{l-1} ... H_1 H_0``. The paper's *Amax gain magnitude*
measures how far that composite is from preserving the signal:

* forward gain ``max_i sum_j |P_ij|`` (largest absolute row sum): how much a residual
  signal can grow going forward;
* backward gain ``max_j sum_i |P_ij|`` (largest absolute column sum): how much a gradient
  can grow going backward (the backward pass multiplies by ``P^T``).

For doubly stochastic ``H_l`` (mHC) both are 1 for every composite; for unconstrained
Hyper-Connections they drift and compound across layers (the paper reports peaks of
~3000 for HC against ~1.6 for mHC in a 27B model).

Layout: this project's ``comb_mix[..., j, i]`` weights stream ``j`` into stream ``i``
(contract §5), so ``H = comb_mix^T``. Functions take ``layout="comb"`` (default: matrices
as :class:`~mhc_kernels.nn.MHCSite` produces them) or ``layout="H"`` (``x_{l+1} = H x_l``).
Matrices may carry any leading (token) dims; statistics are reported per token (max and mean).

Collecting from a model::

    from mhc_kernels import diagnostics
    with diagnostics.collect(model) as rec:   # hooks on every MHCSite of the model
        model(batch)
    report = rec.report()
    print(report.final.forward_max, report.final.backward_max)
    for row in report.layers: ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch

Tensor = torch.Tensor


def residual_matrix(mix: Tensor, layout: str = "comb") -> Tensor:
    """The mapping ``H`` with ``x_{l+1} = H x_l`` (float64): ``comb_mix^T`` or ``mix`` itself."""
    if layout not in ("comb", "H"):
        raise ValueError(f"layout must be 'comb' or 'H'; got {layout!r}")
    m = mix.detach().to(torch.float64)
    return m.transpose(-1, -2) if layout == "comb" else m


def composite(mixes: Sequence[Tensor], layout: str = "comb") -> Tensor:
    """``H_{L-1} ... H_0``: the residual path through all sites (float64, per token)."""
    return prefix_composites(mixes, layout)[-1]


def prefix_composites(mixes: Sequence[Tensor], layout: str = "comb") -> list[Tensor]:
    """``[H_0, H_1 H_0, ..., H_{L-1} ... H_0]``: the composite up to each site."""
    if len(mixes) == 0:
        raise ValueError("need at least one residual mix")
    out, P = [], None
    for mix in mixes:
        H = residual_matrix(mix, layout)
        P = H if P is None else H @ P
        out.append(P)
    return out


def amax_gain(H: Tensor) -> tuple[Tensor, Tensor]:
    """``(forward, backward)`` Amax gain per matrix: max absolute row sum, max absolute column sum.

    ``H`` is ``(..., n, n)`` in the ``x_{l+1} = H x_l`` layout (see :func:`residual_matrix`).
    """
    A = H.detach().to(torch.float64).abs()
    return A.sum(-1).amax(-1), A.sum(-2).amax(-1)


def doubly_stochastic_deviation(H: Tensor) -> Tensor:
    """Per matrix: the largest of ``|row sum - 1|``, ``|column sum - 1|`` and ``-min(entry, 0)``;
    0 exactly on the Birkhoff polytope."""
    A = H.detach().to(torch.float64)
    rows = (A.sum(-1) - 1).abs().amax(-1)
    cols = (A.sum(-2) - 1).abs().amax(-1)
    neg = (-A).clamp(min=0).flatten(-2).amax(-1)
    return torch.maximum(torch.maximum(rows, cols), neg)


@dataclass
class GainStats:
    """Amax gains of one mapping, over tokens."""

    forward_max: float
    forward_mean: float
    backward_max: float
    backward_mean: float

    @classmethod
    def of(cls, H: Tensor) -> "GainStats":
        f, b = amax_gain(H)
        return cls(float(f.max()), float(f.mean()), float(b.max()), float(b.mean()))


@dataclass
class LayerDiagnostics:
    """One site: its own mapping, the composite up to and including it, and its constraint violation."""

    index: int
    name: str
    single: GainStats
    composite: GainStats
    ds_deviation_max: float


@dataclass
class MixingReport:
    layers: list[LayerDiagnostics] = field(default_factory=list)

    @property
    def final(self) -> GainStats:
        """Gains of the full composite (all sites)."""
        return self.layers[-1].composite

    @property
    def worst(self) -> GainStats:
        """Per statistic, the largest value over all prefixes (the paper's curves peak here)."""
        cs = [row.composite for row in self.layers]
        return GainStats(max(c.forward_max for c in cs), max(c.forward_mean for c in cs),
                         max(c.backward_max for c in cs), max(c.backward_mean for c in cs))

    def as_dict(self) -> dict:
        return {"layers": [asdict(r) for r in self.layers], "final": asdict(self.final), "worst": asdict(self.worst)}


def analyze(mixes: Sequence[Tensor], names: Optional[Sequence[str]] = None, layout: str = "comb") -> MixingReport:
    """Per-site diagnostics from the per-site residual mixes (all with the same token dims)."""
    names = list(names) if names is not None else [f"site{i}" for i in range(len(mixes))]
    prefixes = prefix_composites(mixes, layout)
    rep = MixingReport()
    for i, (mix, P) in enumerate(zip(mixes, prefixes)):
        H = residual_matrix(mix, layout)
        rep.layers.append(LayerDiagnostics(i, names[i], GainStats.of(H), GainStats.of(P),
                                           float(doubly_stochastic_deviation(H).max())))
    return rep


class MixCollector:
    """Context manager: records every :class:`~mhc_kernels.nn.MHCSite`'s residual mix during forwards.

    ``comb_mixes`` and ``post_mixes`` (detached, in call order) and ``names`` (the module names)
    fill up while inside the ``with`` block; hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.comb_mixes: list[Tensor] = []
        self.post_mixes: list[Tensor] = []
        self.names: list[str] = []
        self._handles = []

    def __enter__(self) -> "MixCollector":
        from .nn import MHCSite

        for name, mod in self.model.named_modules():
            if isinstance(mod, MHCSite):
                self._handles.append(mod.mix_tap.register_forward_hook(self._hook(name or "site")))
        return self

    def _hook(self, name):
        def hook(_module, _inputs, output):
            post_mix, comb_mix = output
            self.post_mixes.append(post_mix.detach())
            self.comb_mixes.append(comb_mix.detach())
            self.names.append(name)

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.comb_mixes.clear()
        self.post_mixes.clear()
        self.names.clear()

    def report(self) -> MixingReport:
        if not self.comb_mixes:
            raise ValueError("no residual mixes were recorded (does the model contain MHCSite modules, and did a "
                             "forward run inside the with block?)")
        return analyze(self.comb_mixes, self.names, layout="comb")


def collect(model: torch.nn.Module) -> MixCollector:
    """``with collect(model) as rec: model(x)`` -- then ``rec.report()``; see :class:`MixCollector`."""
    return MixCollector(model)
