"""Multi-layer activation recompute for mHC training (contract §8).

An mHC model keeps ``n`` residual streams, so saving every site's residual for backward
costs ``n*C`` elements per token per site, ``n`` times a plain residual. The paper's remedy:
for a block of ``L_r`` consecutive sites keep only the block's input residual ``x_0``, each
sublayer's output and the small per-token mixes; in backward rebuild the block's residuals
``x_l`` and layer inputs ``H_pre x_l`` with the cheap mHC ops alone (no sublayer re-run).

Two pieces:

* :func:`multilayer_recompute` -- the operator (``torch.ops.mhc.multilayer_recompute``, an
  op spec like every other): ``(x_0, layer_outputs, pre_mix, post_mix, comb_mix) ->
  (residuals, layer_inputs)`` for ``L`` sites in one call. Forward-only (it runs inside
  backward); every backend serves it with the composite of its own ``post`` and
  ``pre_apply_mix`` (``mhc_kernels.composite``).
* :func:`checkpoint_sites` -- the training helper: runs a sequence of
  :class:`~mhc_kernels.nn.MHCSite` (each with its sublayer) in blocks of ``block_size``
  sites. Inside a block the residuals ``x_1 .. x_{L_r-1}`` and the layer inputs are not
  kept: wherever autograd would save them (the mHC ops, and the sublayer when it saves
  its own input, e.g. a Linear or RMSNorm), a small handle is saved instead, and the
  first handle unpacked in backward rebuilds the whole block with one
  :func:`multilayer_recompute`. Gradients are those of the plain path (the rebuilt
  values are the forward's values; bit-identical on the reference backend).

Memory per token (elements; paper, section "recomputing"): resident
``n*C*ceil(L/L_r)`` (block inputs) plus ``C*L`` (sublayer outputs) plus the mixes;
transient ``(n+2)*C*L_r`` while one block is rebuilt. The default block size minimises
``n*C*ceil(L/L_r) + (n+2)*C*L_r``, i.e. ``L_r ~ sqrt(n*L/(n+2))`` (:func:`default_block_size`).

Single-pass sites (contract §14; Megatron's single-pass mHC refuses activation recompute) are rebuilt the
same way: per site the carried pre entering it (``n`` floats per token, the first site's one-hot as None)
replaces the raw mixes, the collapse is rebuilt with it and the fused RMSNorm applied again.

The helper composes with an enclosing ``torch.autograd.graph.saved_tensors_hooks``
(tensors it does not replace are handed to the enclosing hooks). It runs in eager
mode; while ``torch.compile`` traces, it runs the plain path.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .errors import MHCInputError
from .functional import multilayer_recompute  # noqa: F401  (the operator, re-exported here)

Tensor = torch.Tensor


# -- block size and the memory model ------------------------------------------------------------------
def default_block_size(num_sites: int, n: int) -> int:
    """The paper's rule: the ``L_r`` in ``1..L`` that minimises ``n*ceil(L/L_r) + (n+2)*L_r``
    (resident block inputs plus the transient rebuilt block); ~ ``sqrt(n*L/(n+2))``. Ties go to
    the smaller block (less recompute held at once)."""
    if num_sites < 1:
        return 1
    return min(range(1, num_sites + 1), key=lambda b: (n * math.ceil(num_sites / b) + (n + 2) * b, b))


def memory_budget(num_sites: int, n: int, C: int, block_size: Optional[int] = None, *, tokens: int = 1,
                  act_bytes: int = 2, mix_bytes: int = 4) -> dict:
    """Bytes the paper's recompute scheme needs for ``num_sites`` mHC sites (``tokens`` tokens).

    * ``resident``: the block inputs, ``n*C*ceil(L/L_r)`` elements per token;
    * ``sublayer_outputs``: ``C*L`` (stored every layer in the paper's table);
    * ``mixes``: the small per-token mixes every site keeps (``m + 1 + n + n*n`` floats:
      raw mixes, rstd, post and comb mixes);
    * ``transient``: ``(n+2)*C*L_r`` while one block is rebuilt in backward;
    * ``plain``: what the plain path keeps per site (residual ``n*C``, layer input ``C``, sublayer
      output ``C``, the mixes), for comparison.
    """
    L = num_sites
    b = block_size or default_block_size(L, n)
    m = n * (n + 2)
    per_site_mix = (m + 1 + n + n * n) * mix_bytes
    out = {
        "block_size": b,
        "resident": n * C * math.ceil(L / b) * act_bytes * tokens,
        "sublayer_outputs": C * L * act_bytes * tokens,
        "mixes": per_site_mix * L * tokens,
        "transient": (n + 2) * C * b * act_bytes * tokens,
        "plain": ((n + 2) * C * act_bytes + per_site_mix) * L * tokens,
    }
    out["saved_budget"] = out["resident"] + out["sublayer_outputs"] + out["mixes"]
    out["total_budget"] = out["saved_budget"] + out["transient"]
    return out


# -- the training helper ----------------------------------------------------------------------------------
class _Outer:
    """What an enclosing saved_tensors_hooks pack hook returned, kept for its unpack hook."""

    __slots__ = ("packed",)

    def __init__(self, packed):
        self.packed = packed


class _Handle:
    """Stands in for a saved residual or layer input; rebuilt on first use in backward."""

    __slots__ = ("block", "kind", "layer", "size", "stride", "offset")

    def __init__(self, block, kind, layer, size, stride, offset):
        self.block, self.kind, self.layer = block, kind, layer
        self.size, self.stride, self.offset = size, stride, offset

    def get(self) -> Tensor:
        full = self.block.rebuilt()[self.kind][self.layer]
        return full.as_strided(self.size, self.stride, full.storage_offset() + self.offset)


def _same_storage(t: Tensor, ref: Tensor) -> bool:
    try:
        return (t.dtype == ref.dtype and t.device == ref.device and t.layout == torch.strided
                and t.untyped_storage().data_ptr() == ref.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (subclasses, ...)
        return False


def _rebuildable(ref: Tensor) -> bool:
    """A tensor a handle can stand in for: contiguous and the sole owner of its storage, so any
    view of that storage maps onto the rebuilt (contiguous) tensor by its offset and strides."""
    try:
        return (ref.layout == torch.strided and ref.is_contiguous() and ref.storage_offset() == 0
                and ref.untyped_storage().nbytes() == ref.numel() * ref.element_size())
    except (RuntimeError, NotImplementedError):
        return False


class _Block:
    """Forward bookkeeping of one block, and its rebuilt activations in backward."""

    def __init__(self, x0: Tensor, single_pass: bool = False):
        self.x0 = x0
        self.single_pass = single_pass
        # per site: (site, layer_output, mixes -- single-pass: the carried pre entering it --, post_mix, comb_mix)
        self.sites = []
        self.watch = []      # (tensor, kind, layer) the current site may save: its residual and layer input
        self.cache = None
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        self.outer = top(False) if top is not None else None

    def set_watch(self, items) -> None:
        """The tensors of the current site that may be replaced by handles: ``(tensor, kind, layer)``."""
        self.watch = [w for w in items if _rebuildable(w[0])]

    # saved_tensors_hooks
    def pack(self, t):
        for ref, kind, layer in self.watch:
            if _same_storage(t, ref):
                return _Handle(self, kind, layer, tuple(t.size()), tuple(t.stride()),
                               t.storage_offset() - ref.storage_offset())
        if self.outer is not None:
            return _Outer(self.outer[0](t))
        return t

    def unpack(self, p):
        if isinstance(p, _Handle):
            return p.get()
        if isinstance(p, _Outer):
            return self.outer[1](p.packed)
        return p

    def rebuilt(self) -> dict:
        if self.cache is None:
            with torch.no_grad():
                ys = torch.stack([s[1] for s in self.sites])
                if self.single_pass:  # the collapse uses the carried pre (one-hot at the model's first site)
                    pre = torch.stack([_collapse_pre(carried, self.x0) for _, _, carried, _, _ in self.sites])
                else:
                    pre = torch.stack([site.pre_mix_from_mixes(mixes) for site, _, mixes, _, _ in self.sites])
                post = torch.stack([s[3] for s in self.sites])
                comb = torch.stack([s[4] for s in self.sites])
                residuals, inputs = multilayer_recompute(self.x0, ys, pre, post, comb)
                if self.single_pass:  # the sublayer's input is the normalised collapse (contract §14)
                    inputs = torch.stack([_sublayer_input(site, u) for (site, *_), u in zip(self.sites, inputs)])
            self.cache = {"residual": residuals, "layer_input": inputs}
        return self.cache


def _collapse_pre(carried: Optional[Tensor], x0: Tensor) -> Tensor:
    """The pre a single-pass site collapses with; None (the model's first site) as the one-hot on stream 0,
    whose float32 collapse is stream 0 exactly, as the forward's copy."""
    from .composite import one_hot_pre

    md = torch.float64 if x0.dtype == torch.float64 else torch.float32
    return one_hot_pre(x0.reshape(-1, *x0.shape[-2:]), md).reshape(x0.shape[:-1]) if carried is None else carried


def _sublayer_input(site, u: Tensor) -> Tensor:
    """A single-pass site's layer input from its rebuilt collapse ``u``: the fused RMSNorm, as in forward."""
    from .composite import out_norm

    if site.out_norm_weight is None:
        return u
    md = torch.float64 if u.dtype == torch.float64 else torch.float32
    flat = u.reshape(-1, u.shape[-1])
    v, _ = out_norm(flat, site.out_norm_weight.to(md), site.out_norm_eps, md)
    return v.reshape(u.shape)


def _pairs(sites, sublayers):
    out = []
    for i, s in enumerate(sites):
        if isinstance(s, (tuple, list)):
            site, sub = s
        else:
            site, sub = s, (sublayers[i] if sublayers is not None else None)
        if sub is None:
            sub = getattr(site, "sublayer", None)
        if sub is None:
            raise MHCInputError(f"checkpoint_sites: site {i} has no sublayer (pass sublayers=... or build the "
                                f"MHCSite with sublayer=...)")
        out.append((site, sub))
    return out


def _run_plain(residual, pairs):
    for site, sub in pairs:
        residual = site(residual, sub)
    return residual


def _run_block(x0: Tensor, pairs) -> Tensor:
    block = _Block(x0)
    x = x0
    with torch.autograd.graph.saved_tensors_hooks(block.pack, block.unpack):
        for layer, (site, sub) in enumerate(pairs):
            own = [] if layer == 0 else [(x, "residual", layer)]  # x_0 is the block's resident input
            block.set_watch(own)
            li, post_mix, comb_mix, mixes = site.pre(x)
            block.set_watch(own + [(li, "layer_input", layer)])
            y = site.cast_output(sub(li), x)
            block.set_watch(own)
            new_x = site.post(y, x, post_mix, comb_mix)
            block.sites.append((site, y.detach(), mixes.detach(), post_mix.detach(), comb_mix.detach()))
            block.set_watch([])
            x = new_x
    return x


def _run_block_single_pass(x0: Tensor, pre0: Optional[Tensor], pairs):
    """A block of single-pass sites: kept are x_0, the carried pre entering the block, every sublayer output
    and per site (carried pre, post, comb); the residuals and layer inputs inside are rebuilt."""
    block = _Block(x0, single_pass=True)
    x, carried = x0, pre0
    with torch.autograd.graph.saved_tensors_hooks(block.pack, block.unpack):
        for layer, (site, sub) in enumerate(pairs):
            own = [] if layer == 0 else [(x, "residual", layer)]
            block.set_watch(own)
            li, pre, post_mix, comb_mix = site.pre_single_pass(x, carried)
            block.set_watch(own + [(li, "layer_input", layer)])
            y = site.cast_output(sub(li), x)
            block.set_watch(own)
            new_x = site.post(y, x, post_mix, comb_mix)
            block.sites.append((site, y.detach(), None if carried is None else carried.detach(),
                                post_mix.detach(), comb_mix.detach()))
            block.set_watch([])
            x, carried = new_x, pre
    return x, carried


def checkpoint_sites(residual: Tensor, sites: Sequence, sublayers: Optional[Sequence] = None, *,
                     block_size: Optional[int] = None, enabled: bool = True) -> Tensor:
    """Run mHC sites in blocks with multi-layer recompute; returns the last residual.

    Args:
        residual: ``(..., n, C)`` the first site's input; for single-pass sites
            (``MHCSite(single_pass=True)``) the chain state ``(residual, pre)``, and the chain state is returned.
        sites: :class:`~mhc_kernels.nn.MHCSite` modules (each with its ``sublayer``), or
            ``(site, sublayer)`` pairs.
        sublayers: optional sublayers, one per site (overrides ``site.sublayer``).
        block_size: sites per block (``L_r``); default :func:`default_block_size`.
        enabled: ``False`` runs the plain path (same result, everything saved).

    The result and every gradient equal the plain path's. Without grad mode (or when nothing
    requires grad) and while ``torch.compile`` traces, the plain path runs.

    Example::

        >>> from mhc_kernels.nn import MHCSite
        >>> sites = [MHCSite(64, 4, sublayer=torch.nn.Linear(64, 64)) for _ in range(6)]
        >>> x = torch.randn(8, 4, 64, requires_grad=True)
        >>> checkpoint_sites(x, sites, block_size=3).sum().backward()   # keeps 2 residuals, not 6
        >>> x.grad.shape
        torch.Size([8, 4, 64])
    """
    pairs = _pairs(sites, sublayers)
    if not pairs:
        return residual
    single = {bool(getattr(site, "single_pass", False)) for site, _ in pairs}
    if len(single) > 1:
        raise MHCInputError("checkpoint_sites: the sites mix single-pass and two-pass dataflows")
    single_pass = single.pop()
    if single_pass and not (isinstance(residual, (tuple, list)) and len(residual) == 2):
        raise MHCInputError("checkpoint_sites: single-pass sites take the chain state (residual, pre); start it "
                            "with MHCExpand(n, single_pass=True)")
    if (not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return _run_plain(residual, pairs)
    x = residual[0] if single_pass else residual
    n = x.shape[-2]
    b = block_size or default_block_size(len(pairs), n)
    if b < 1:
        raise MHCInputError(f"checkpoint_sites: block_size must be >= 1; got {b}")
    for start in range(0, len(pairs), b):
        if single_pass:
            residual = _run_block_single_pass(residual[0], residual[1], pairs[start:start + b])
        else:
            residual = _run_block(residual, pairs[start:start + b])
    return residual
