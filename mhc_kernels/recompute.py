"""Multi-layer activation recompute for mHC training (DESIGN 2.7).

An mHC model keeps ``n`` residual streams, so saving every site's residual for backward
costs ``n*C`` elements per token per site, ``n`` times a plain residual. The paper's remedy:
for a block of ``L_r`` consecutive sites keep only the block's input residual ``x_0``, each
sublayer's output and the small per-token mixes; in backward rebuild the block's residuals
``x_l`` and layer inputs ``H_pre x_l`` with the cheap mHC ops alone (no sublayer re-run).

Two pieces:

* :func:`multilayer_recompute` -- the operator (``torch.ops.mhc.multilayer_recompute``):
  ``(x_0, layer_outputs, pre_mix, post_mix, comb_mix) -> (residuals, layer_inputs)`` for
  ``L`` sites in one call. Forward-only (it runs inside backward); backends register a
  kernel for op ``"multilayer_recompute"`` like any other: the reference, and Triton and
  TileLang through :func:`composed_kernel` from their own ``post`` and ``pre_apply_mix``.
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

The helper composes with an enclosing ``torch.autograd.graph.saved_tensors_hooks``
(tensors it does not replace are handed to the enclosing hooks). It runs in eager
mode; while ``torch.compile`` traces, it runs the plain path.
"""

from __future__ import annotations

import math
import types
from typing import Optional, Sequence

import torch

from . import registry
from .errors import MHCDtypeError, MHCInputError
from .validation import Call

Tensor = torch.Tensor

OP_NAME = "multilayer_recompute"
_SPEC = types.SimpleNamespace(name=OP_NAME)  # what the registry needs of a spec: the op name


# -- the operator ----------------------------------------------------------------------------
def _fail(msg, cls=MHCInputError):
    raise cls(f"mhc.{OP_NAME}: {msg}")


def _bind(residual, layer_outputs, pre_mix, post_mix, comb_mix) -> Call:
    if not isinstance(residual, torch.Tensor) or residual.dim() < 2:
        _fail(f"argument 'residual' must be a tensor of shape (..., n, C); got "
              f"{tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__}")
    act = residual.dtype
    if act not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        _fail(f"argument 'residual' must be bfloat16, float16 or float32; got {act}", MHCDtypeError)
    md = torch.float64 if act == torch.float64 else torch.float32
    lead = tuple(residual.shape[:-2])
    n, C = residual.shape[-2], residual.shape[-1]
    if not isinstance(layer_outputs, torch.Tensor) or layer_outputs.dim() != len(lead) + 2:
        _fail(f"argument 'layer_outputs' must have shape (L, ..., C) with the residual's leading dims {lead}; "
              f"got {tuple(getattr(layer_outputs, 'shape', ()))}")
    L = layer_outputs.shape[0]
    if L < 1:
        _fail("argument 'layer_outputs' must hold at least one layer (L >= 1)")
    want = {
        "layer_outputs": ((L,) + lead + (C,), act),
        "pre_mix": ((L,) + lead + (n,), md),
        "post_mix": ((L,) + lead + (n,), md),
        "comb_mix": ((L,) + lead + (n, n), md),
    }
    given = {"layer_outputs": layer_outputs, "pre_mix": pre_mix, "post_mix": post_mix, "comb_mix": comb_mix}
    T = 1
    for s in lead:
        T = T * s
    args = [residual.reshape((T, n, C)).contiguous()]
    for name, (shape, dtype) in want.items():
        t = given[name]
        if not isinstance(t, torch.Tensor):
            _fail(f"argument '{name}' must be a tensor of shape {shape}; got {type(t).__name__}")
        if t.device != residual.device:
            _fail(f"argument '{name}' is on {t.device} but 'residual' is on {residual.device}")
        if t.dtype != dtype:
            _fail(f"argument '{name}' must be {dtype}; got {t.dtype}", MHCDtypeError)
        if tuple(t.shape) != shape:
            _fail(f"argument '{name}' must have shape {shape} to match 'residual' {tuple(residual.shape)} and "
                  f"L={L}; got {tuple(t.shape)}")
        args.append(t.reshape((L, T) + shape[1 + len(lead):]).contiguous())
    return Call(_SPEC, args, T, n, C, lead, act, md, residual.device)


def _body(residual, layer_outputs, pre_mix, post_mix, comb_mix):
    c = _bind(residual, layer_outputs, pre_mix, post_mix, comb_mix)
    residuals, inputs = registry.select(c).fn(*c.args)
    L = layer_outputs.shape[0]
    return (residuals.reshape((L,) + tuple(residual.shape)),
            inputs.reshape((L,) + tuple(residual.shape[:-2]) + (residual.shape[-1],)))


_op = torch.library.custom_op(
    f"mhc::{OP_NAME}", _body, mutates_args=(),
    schema="(Tensor residual, Tensor layer_outputs, Tensor pre_mix, Tensor post_mix, Tensor comb_mix) "
           "-> (Tensor, Tensor)")


@_op.register_fake
def _fake(residual, layer_outputs, pre_mix, post_mix, comb_mix):
    L = layer_outputs.shape[0]
    return (residual.new_empty((L,) + tuple(residual.shape)),
            residual.new_empty((L,) + tuple(residual.shape[:-2]) + (residual.shape[-1],)))


def multilayer_recompute(residual: Tensor, layer_outputs: Tensor, pre_mix: Tensor, post_mix: Tensor,
                         comb_mix: Tensor) -> tuple[Tensor, Tensor]:
    """Rebuild L consecutive sites' residuals and layer inputs from the first residual (DESIGN 2.7).

    Args:
        residual: ``(..., n, C)`` x_0, the first site's input residual.
        layer_outputs: ``(L, ..., C)`` each site's sublayer output (residual dtype).
        pre_mix, post_mix: ``(L, ..., n)`` float32; comb_mix: ``(L, ..., n, n)`` float32.

    Returns:
        ``(residuals (L, ..., n, C), layer_inputs (L, ..., C))``: ``residuals[l] = x_l`` (x_0
        copied) with ``x_{l+1} = post(layer_outputs[l], x_l, post_mix[l], comb_mix[l])``, and
        ``layer_inputs[l] = pre_apply_mix(x_l, pre_mix[l])``; every x_l is rounded to the
        residual dtype before it is read again. The last site's output and post/comb mixes are
        not read. Forward-only: call it under ``torch.no_grad()``.
    """
    if torch.compiler.is_compiling():
        return torch.ops.mhc.multilayer_recompute(residual, layer_outputs, pre_mix, post_mix, comb_mix)
    return _body(residual, layer_outputs, pre_mix, post_mix, comb_mix)


def composed_kernel(post_fwd, pre_apply_mix_fwd):
    """A backend's ``multilayer_recompute`` kernel built from its own ``post`` and ``pre_apply_mix``.

    ``post_fwd(y, x, post_mix, comb_mix, out=...)`` and ``pre_apply_mix_fwd(x, pre_mix, out=...)``
    write straight into the per-layer slices of the two output buffers, so the composition adds
    no copies: per layer it reads x_l twice (collapse, then post) and writes x_{l+1} and the
    layer input once each. Takes and returns the flattened shapes of
    :func:`mhc_kernels.reference.torch_ref.multilayer_recompute_fwd`.
    """

    def multilayer_recompute_fwd(residual, layer_outputs, pre_mix, post_mix, comb_mix):
        L = layer_outputs.shape[0]
        T, n, C = residual.shape
        residuals = residual.new_empty((L, T, n, C))
        layer_inputs = residual.new_empty((L, T, C))
        residuals[0].copy_(residual)
        for layer in range(L):
            x = residuals[layer]
            pre_apply_mix_fwd(x, pre_mix[layer], out=layer_inputs[layer])
            if layer + 1 < L:
                post_fwd(layer_outputs[layer], x, post_mix[layer], comb_mix[layer], out=residuals[layer + 1])
        return residuals, layer_inputs

    return multilayer_recompute_fwd


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

    def __init__(self, x0: Tensor):
        self.x0 = x0
        self.sites = []      # per site: (site, layer_output, mixes, post_mix, comb_mix)
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
                pre = torch.stack([site.pre_mix_from_mixes(mixes) for site, _, mixes, _, _ in self.sites])
                post = torch.stack([s[3] for s in self.sites])
                comb = torch.stack([s[4] for s in self.sites])
                residuals, inputs = multilayer_recompute(self.x0, ys, pre, post, comb)
            self.cache = {"residual": residuals, "layer_input": inputs}
        return self.cache


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


def checkpoint_sites(residual: Tensor, sites: Sequence, sublayers: Optional[Sequence] = None, *,
                     block_size: Optional[int] = None, enabled: bool = True) -> Tensor:
    """Run mHC sites in blocks with multi-layer recompute; returns the last residual.

    Args:
        residual: ``(..., n, C)`` the first site's input.
        sites: :class:`~mhc_kernels.nn.MHCSite` modules (each with its ``sublayer``), or
            ``(site, sublayer)`` pairs.
        sublayers: optional sublayers, one per site (overrides ``site.sublayer``).
        block_size: sites per block (``L_r``); default :func:`default_block_size`.
        enabled: ``False`` runs the plain path (same result, everything saved).

    The result and every gradient equal the plain path's. Without grad mode (or when nothing
    requires grad) and while ``torch.compile`` traces, the plain path runs.
    """
    pairs = _pairs(sites, sublayers)
    if not pairs:
        return residual
    if (not enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return _run_plain(residual, pairs)
    n = residual.shape[-2]
    b = block_size or default_block_size(len(pairs), n)
    if b < 1:
        raise MHCInputError(f"checkpoint_sites: block_size must be >= 1; got {b}")
    for start in range(0, len(pairs), b):
        residual = _run_block(residual, pairs[start:start + b])
    return residual
