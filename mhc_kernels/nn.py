"""Drop-in ``nn.Module`` building blocks for mHC models.

* :class:`MHCExpand` -- embedding ``(..., C)`` -> ``n`` identical streams ``(..., n, C)``;
* :class:`MHCSite` -- one mHC site around any sublayer (attention, MLP, ...):
  ``mhc_pre -> sublayer -> mhc_post``; replaces ``h = h + sublayer(h)``;
* :class:`MHCHead` -- the final collapse ``(..., n, C) -> (..., C)`` before the LM head.

A pre-norm transformer block ``h = h + attn(norm1(h)); h = h + mlp(norm2(h))`` becomes::

    self.expand = MHCExpand(n)                                     # once, after the embedding
    self.attn_site = MHCSite(C, n, sublayer=nn.Sequential(norm1, attn))
    self.mlp_site = MHCSite(C, n, sublayer=nn.Sequential(norm2, mlp))
    self.head = MHCHead(C, n)                                      # once, before the final norm

    x = self.expand(embed(tokens))            # (B, S, n, C)
    x = self.attn_site(x); x = self.mlp_site(x)   # per block
    logits = lm_head(final_norm(self.head(x)))

Initialisation (the paper's recipe: small gains, biases that make the site start as a plain
pre-norm residual; ``alpha`` and ``identity_tol`` are the knobs):

* ``scale = (alpha, alpha, alpha)`` with ``alpha = 0.01``: the input-dependent part of every
  mix starts as a 1% perturbation of the static (bias) part;
* ``fn ~ N(0, 1/K)``, so the raw mixes (a projection of the RMS-normalised streams) are
  O(1) and ``alpha * mixes`` is O(0.01); random rather than zero so the streams, which start
  as copies, can drift apart (with ``fn = 0`` every stream permutation is a symmetry and the
  streams would stay identical forever);
* pre-mix bias ``logit(1/n)``: ``H_pre ~ (1/n, ..., 1/n)``, the sublayer sees the average of
  the streams, which after :class:`MHCExpand` is exactly the embedding;
* post-mix bias ``logit(1/post_mult)`` (0 for the default ``post_mult = 2``):
  ``H_post ~ (1, ..., 1)``, the sublayer output is added to every stream, as ``h + f(h)``;
* residual-mix bias ``-g * (1 - I)`` with ``g = ln((n-1)(1-tol)/tol)``: Sinkhorn of it is the
  symmetric matrix with ``1 - tol`` on the diagonal and ``tol/(n-1)`` elsewhere, so
  ``|H_res - I| <= identity_tol`` (default 0.01; the alpha perturbation adds a few percent of
  that). A smaller ``tol`` starts closer to the identity but saturates the softmax (the
  gradient of the off-diagonal logits scales with ``tol``); 0.01 keeps both small.
  For the unconstrained ablation (``residual_mix="none"``) the bias is ``I`` itself.
* the head's bias is ``logit(1/n)`` (average the streams), ``norm_weight = 1``.

With these, an mHC model at initialisation computes (up to the 1% perturbations) what the
same model with plain residual connections computes.

All modules run the mHC math in float32 with autocast switched off around the mHC ops
(the sublayer still runs under the caller's autocast; its output is cast to the residual's
dtype), keep their own parameters in float32 even after ``model.bfloat16()`` or ``.half()``
(:class:`Float32Parameters`: the float32 master copy; the sublayers are cast as usual),
and compile under ``torch.compile(fullgraph=True)`` without graph breaks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
from torch import nn

from . import composite, functional
from .errors import MHCInputError
from .validation import check_constants, check_count

Tensor = torch.Tensor

RESIDUAL_MIXES = ("sinkhorn", "none")


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _autocast_off(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _mix_dtype(residual: Tensor) -> torch.dtype:
    return torch.float64 if residual.dtype == torch.float64 else torch.float32


def _as(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _check_streams(owner: str, residual: Tensor, n: int, C: int) -> None:
    """The residual of a module built for ``n`` streams of width ``C`` must be ``(..., n, C)``."""
    if residual.dim() >= 2 and tuple(residual.shape[-2:]) == (n, C):
        return
    hint = ""
    if residual.shape[-1:] == (C,):
        hint = (f" -- did you call MHCExpand first? An embedding (..., C) must be expanded into the n streams "
                f"(MHCExpand({n})) before the first site")
    raise MHCInputError(f"{owner}: the residual must have shape (..., n={n}, C={C}); got {tuple(residual.shape)}"
                        f"{hint}")


class Float32Parameters(nn.Module):
    """Keeps the module's own parameters in float32 (the master copy mixed-precision training expects) when
    the model is cast to a low-precision dtype: ``model.bfloat16()`` / ``.half()`` / ``.to(torch.bfloat16)``
    cast the sublayers, not the mHC parameters (``.double()`` is kept: the float64 check mode)."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for p in self._parameters.values():
            if p is not None and p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
                if p.grad is not None:
                    p.grad.data = p.grad.data.float()
        return self


class MixTap(nn.Module):
    """Identity on ``(post_mix, comb_mix)``; a place for forward hooks to observe the mixes
    (see :mod:`mhc_kernels.diagnostics`). Costs nothing when no hook is registered."""

    def forward(self, post_mix: Tensor, comb_mix: Tensor):
        return post_mix, comb_mix


class MHCExpand(nn.Module):
    """``(..., C) -> (..., n, C)``: copy the embedding into ``n`` streams (contract §7).

    Example::

        >>> MHCExpand(4)(torch.randn(2, 8, 64)).shape
        torch.Size([2, 8, 4, 64])
    """

    def __init__(self, n: int = 4, *, single_pass: bool = False):
        super().__init__()
        check_count("MHCExpand", "n", n, "the number of streams")
        self.n = n
        self.single_pass = bool(single_pass)

    def forward(self, hidden: Tensor):
        """-> the residual ``(..., n, C)``; with ``single_pass`` the chain's start ``(residual, None)`` (the first
        site collapses stream 0)."""
        x = functional.expand(hidden, self.n)
        return (x, None) if self.single_pass else x

    def extra_repr(self) -> str:
        return f"n={self.n}" + (", single_pass=True" if self.single_pass else "")


class MHCSite(Float32Parameters):
    """One mHC site: ``mhc_pre -> sublayer -> mhc_post`` (contract §6, §5).

    Args:
        hidden: the hidden width ``C`` (the sublayer's input and output width).
        n: the number of residual streams.
        sublayer: optional module run on the collapsed ``(..., C)`` input; may instead be passed
            to :meth:`forward`. It should contain its own pre-norm (as in a pre-norm transformer).
        norm_weight: learn an RMSNorm gain ``(n*C,)`` folded into ``fn``.
        residual_mix: ``"sinkhorn"`` (mHC, default) or ``"none"``: the unconstrained
            Hyper-Connections ablation -- same parameters and pre/post mixes, but the residual
            mix is the raw ``n x n`` matrix ``alpha * mixes + base`` (no Sinkhorn).
        alpha: initial value of the three gains ``scale``.
        identity_tol: at initialisation ``max |H_res - I| ~ identity_tol`` (sinkhorn mode).
        norm_eps, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps: the contract's constants.
        single_pass: DeepSeek-V4.1's dataflow (contract §14): :meth:`forward` takes and returns the chain
            state ``(residual, pre)``; the sublayer input is collapsed with the previous site's ``pre``
            (stream 0 when it is None, after :class:`MHCExpand` with ``single_pass=True``).
        sublayer_norm: (single-pass) learn the sublayer's input RMSNorm ``out_norm_weight (C,)`` (init 1)
            and apply it inside the op, from the rounded collapse; then the sublayer should not carry
            its own pre-norm. ``out_norm_eps`` is its eps (V4.1: 1e-20).
        device: where to create the parameters (always float32).

    Parameters: ``fn (n*(n+2), n*C)``, ``scale (3,)``, ``base (n*(n+2),)``, optional
    ``norm_weight (n*C,)`` -- the layout of the contract (§1) -- and with ``sublayer_norm``
    ``out_norm_weight (C,)``. See the module docstring for the initialisation (the same in both
    dataflows).

    Example::

        >>> site = MHCSite(64, 4, sublayer=torch.nn.Linear(64, 64))
        >>> x = torch.randn(2, 8, 4, 64)                     # (batch, seq, n, C)
        >>> site(x).shape
        torch.Size([2, 8, 4, 64])
    """

    def __init__(self, hidden: int, n: int = 4, *, sublayer: Optional[nn.Module] = None, norm_weight: bool = True,
                 residual_mix: str = "sinkhorn", alpha: float = 0.01, identity_tol: float = 1e-2,
                 norm_eps: float = 1e-6, pre_eps: float = 1e-6, post_mult: float = 2.0, sinkhorn_iters: int = 20,
                 sinkhorn_eps: float = 1e-6, single_pass: bool = False, sublayer_norm: bool = False,
                 out_norm_eps: float = 1e-6, device=None):
        super().__init__()
        check_count("MHCSite", "hidden", hidden, "the hidden width C")
        check_constants("MHCSite", out_norm_eps=out_norm_eps)
        if sublayer_norm and not single_pass:
            raise MHCInputError("MHCSite: sublayer_norm=True needs single_pass=True (the two-pass site leaves the "
                                "norm to the sublayer)")
        if single_pass and residual_mix != "sinkhorn":
            raise MHCInputError("MHCSite: single_pass=True supports residual_mix='sinkhorn' only")
        self.single_pass, self.out_norm_eps = bool(single_pass), float(out_norm_eps)
        check_count("MHCSite", "n", n, "the number of streams")
        check_constants("MHCSite", norm_eps=norm_eps, pre_eps=pre_eps, post_mult=post_mult,
                        sinkhorn_iters=sinkhorn_iters, sinkhorn_eps=sinkhorn_eps)
        if not math.isfinite(alpha):
            raise MHCInputError(f"MHCSite: alpha must be finite; got {alpha!r}")
        if residual_mix not in RESIDUAL_MIXES:
            raise ValueError(f"MHCSite: residual_mix must be one of {RESIDUAL_MIXES}; got {residual_mix!r}")
        if not 0 < identity_tol < 1:
            raise ValueError(f"MHCSite: identity_tol must be in (0, 1); got {identity_tol}")
        self.hidden, self.n = int(hidden), int(n)
        self.residual_mix = residual_mix
        self.alpha, self.identity_tol = float(alpha), float(identity_tol)
        self.norm_eps, self.pre_eps, self.post_mult = float(norm_eps), float(pre_eps), float(post_mult)
        self.sinkhorn_iters, self.sinkhorn_eps = int(sinkhorn_iters), float(sinkhorn_eps)
        m, K = n * (n + 2), n * hidden
        f32 = dict(device=device, dtype=torch.float32)
        self.fn = nn.Parameter(torch.empty(m, K, **f32))
        self.scale = nn.Parameter(torch.empty(3, **f32))
        self.base = nn.Parameter(torch.empty(m, **f32))
        if norm_weight:
            self.norm_weight = nn.Parameter(torch.empty(K, **f32))
        else:
            self.register_parameter("norm_weight", None)
        if sublayer_norm:
            self.out_norm_weight = nn.Parameter(torch.empty(hidden, **f32))
        else:
            self.register_parameter("out_norm_weight", None)
        self.sublayer = sublayer
        self.mix_tap = MixTap()
        self.reset_parameters()

    # -- initialisation ----------------------------------------------------------------------
    def initial_base(self) -> Tensor:
        """The bias vector of the module docstring's initialisation."""
        n = self.n
        pre = torch.full((n,), _logit(1.0 / n))
        post = torch.full((n,), _logit(1.0 / self.post_mult) if self.post_mult > 1 else 4.0)
        eye = torch.eye(n)
        if self.residual_mix == "none":
            res = eye
        else:
            tol = self.identity_tol
            gap = math.log((n - 1) * (1 - tol) / tol) if n > 1 else 0.0
            res = -gap * (1 - eye)
        return torch.cat([pre, post, res.reshape(-1)])

    @torch.no_grad()
    def reset_parameters(self) -> None:
        K = self.fn.shape[1]
        nn.init.normal_(self.fn, std=K ** -0.5)
        self.scale.fill_(self.alpha)
        self.base.copy_(self.initial_base())
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)
        if self.out_norm_weight is not None:
            self.out_norm_weight.fill_(1.0)

    # -- the two halves (also used by mhc_kernels.recompute) ----------------------------------
    def _params(self, md):
        return _as(self.fn, md), _as(self.scale, md), _as(self.base, md), _as(self.norm_weight, md)

    def _split_unconstrained(self, mixes, scale, base):
        """HC's gates: split_mixes without the Sinkhorn (the residual mix is the raw ``n x n`` logits)."""
        z = composite.gate_logits(mixes, scale, base, self.n)
        return composite.split_gates(z, self.n, self.pre_eps, self.post_mult)

    def pre(self, residual: Tensor):
        """``residual (..., n, C)`` -> ``(layer_input, post_mix, comb_mix, mixes)``; ``mixes`` are the
        raw (pre-gain) mixes ``(..., n*(n+2))`` that :meth:`pre_mix_from_mixes` turns back into
        the pre-mix."""
        _check_streams("MHCSite", residual, self.n, self.hidden)
        md = _mix_dtype(residual)
        fn, scale, base, nw = self._params(md)
        with _autocast_off(residual.device):
            if self.residual_mix == "sinkhorn":
                li, post_mix, comb_mix, mixes = functional.mhc_pre(
                    residual, fn, scale, base, norm_weight=nw, norm_eps=self.norm_eps, pre_eps=self.pre_eps,
                    post_mult=self.post_mult, sinkhorn_iters=self.sinkhorn_iters, sinkhorn_eps=self.sinkhorn_eps,
                    return_mixes=True)
            else:
                mixes = functional.norm_fn(residual, fn, norm_weight=nw, norm_eps=self.norm_eps)
                pre_mix, post_mix, comb_mix = self._split_unconstrained(mixes, scale, base)
                li = functional.pre_apply_mix(residual, pre_mix)
        post_mix, comb_mix = self.mix_tap(post_mix, comb_mix)
        return li, post_mix, comb_mix, mixes

    @torch.no_grad()
    def pre_mix_from_mixes(self, mixes: Tensor) -> Tensor:
        """The pre-mix ``(..., n)`` the forward used, from the saved raw mixes (cheap; no residual read)."""
        fn, scale, base, _ = self._params(mixes.dtype)
        with _autocast_off(mixes.device):
            return composite.pre_mix(mixes, scale, base, self.pre_eps)

    @staticmethod
    def cast_output(layer_output: Tensor, residual: Tensor) -> Tensor:
        """The sublayer output in the residual's dtype (autocast may have changed it)."""
        return layer_output if layer_output.dtype == residual.dtype else layer_output.to(residual.dtype)

    def post(self, layer_output: Tensor, residual: Tensor, post_mix: Tensor, comb_mix: Tensor) -> Tensor:
        with _autocast_off(residual.device):
            return functional.mhc_post(self.cast_output(layer_output, residual), residual, post_mix, comb_mix)

    def pre_single_pass(self, residual: Tensor, prev_pre: Optional[Tensor]):
        """``(residual, prev_pre)`` -> ``(layer_input, pre, post_mix, comb_mix)`` (contract §14)."""
        _check_streams("MHCSite", residual, self.n, self.hidden)
        md = _mix_dtype(residual)
        fn, scale, base, nw = self._params(md)
        with _autocast_off(residual.device):
            li, pre, post_mix, comb_mix = functional.mhc_pre_sp(
                residual, _as(prev_pre, md), fn, scale, base, norm_weight=nw, norm_eps=self.norm_eps,
                pre_eps=self.pre_eps, post_mult=self.post_mult, sinkhorn_iters=self.sinkhorn_iters,
                sinkhorn_eps=self.sinkhorn_eps, out_norm_weight=_as(self.out_norm_weight, md),
                out_norm_eps=self.out_norm_eps)
        post_mix, comb_mix = self.mix_tap(post_mix, comb_mix)
        return li, pre, post_mix, comb_mix

    def forward(self, residual, sublayer: Optional[nn.Module] = None):
        """``residual (..., n, C)`` -> the new residual ``(..., n, C)``, same dtype; single-pass: ``(residual,
        prev_pre)`` -> ``(new_residual, pre)``."""
        sublayer = sublayer if sublayer is not None else self.sublayer
        if sublayer is None:
            raise ValueError("MHCSite: no sublayer (pass one to forward or build the site with sublayer=...)")
        if self.single_pass:
            if not isinstance(residual, (tuple, list)) or len(residual) != 2:
                raise MHCInputError("MHCSite(single_pass=True): forward takes the chain state (residual, pre); "
                                    "start it with MHCExpand(n, single_pass=True), which gives (residual, None)")
            residual, prev_pre = residual
            li, pre, post_mix, comb_mix = self.pre_single_pass(residual, prev_pre)
            return self.post(sublayer(li), residual, post_mix, comb_mix), pre
        li, post_mix, comb_mix, _ = self.pre(residual)
        return self.post(sublayer(li), residual, post_mix, comb_mix)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, n={self.n}, residual_mix={self.residual_mix!r}, "
                f"norm_weight={self.norm_weight is not None}"
                + (f", single_pass=True, sublayer_norm={self.out_norm_weight is not None}" if self.single_pass else ""))


class MHCHead(Float32Parameters):
    """``(..., n, C) -> (..., C)``: the final collapse of the streams before the LM head (contract §7).

    Parameters ``fn (n, n*C)``, ``scale (1,)``, ``base (n,)``, optional ``norm_weight (n*C,)``;
    initialised to average the streams (``base = logit(1/n)``, ``scale = alpha``).

    Example::

        >>> MHCHead(64, 4)(torch.randn(2, 8, 4, 64)).shape
        torch.Size([2, 8, 64])
    """

    def __init__(self, hidden: int, n: int = 4, *, norm_weight: bool = True, alpha: float = 0.01,
                 norm_eps: float = 1e-6, pre_eps: float = 1e-6, device=None):
        super().__init__()
        check_count("MHCHead", "hidden", hidden, "the hidden width C")
        check_count("MHCHead", "n", n, "the number of streams")
        check_constants("MHCHead", norm_eps=norm_eps, pre_eps=pre_eps)
        if not math.isfinite(alpha):
            raise MHCInputError(f"MHCHead: alpha must be finite; got {alpha!r}")
        self.hidden, self.n, self.alpha = int(hidden), int(n), float(alpha)
        self.norm_eps, self.pre_eps = float(norm_eps), float(pre_eps)
        K = n * hidden
        f32 = dict(device=device, dtype=torch.float32)
        self.fn = nn.Parameter(torch.empty(n, K, **f32))
        self.scale = nn.Parameter(torch.empty(1, **f32))
        self.base = nn.Parameter(torch.empty(n, **f32))
        if norm_weight:
            self.norm_weight = nn.Parameter(torch.empty(K, **f32))
        else:
            self.register_parameter("norm_weight", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.fn, std=self.fn.shape[1] ** -0.5)
        self.scale.fill_(self.alpha)
        self.base.fill_(_logit(1.0 / self.n))
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)

    def forward(self, residual: Tensor) -> Tensor:
        _check_streams("MHCHead", residual, self.n, self.hidden)
        md = _mix_dtype(residual)
        with _autocast_off(residual.device):
            return functional.mhc_head(residual, _as(self.fn, md), _as(self.scale, md), _as(self.base, md),
                                       norm_weight=_as(self.norm_weight, md), norm_eps=self.norm_eps,
                                       pre_eps=self.pre_eps)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, n={self.n}, norm_weight={self.norm_weight is not None}"


class MHCSinglePassHead(Float32Parameters):
    """``(residual, pre) -> (..., C)``: the single-pass model's last collapse (contract §14): the final
    residual collapsed with the last site's ``pre`` -- no learned head parameters -- optionally followed by
    the model's final RMSNorm (``final_norm``: a weight ``(C,)``, init 1, eps ``out_norm_eps``). ``mean=True``
    collapses with the constant ``1/n`` instead (GLM-5.3's mean head; the chain's ``pre`` is ignored).

    Example::

        >>> C, n = 64, 4
        >>> sites = [MHCSite(C, n, sublayer=torch.nn.Linear(C, C), single_pass=True, sublayer_norm=True)
        ...          for _ in range(2)]
        >>> model = torch.nn.Sequential(MHCExpand(n, single_pass=True), *sites, MHCSinglePassHead(C, n))
        >>> model(torch.randn(2, 8, C)).shape
        torch.Size([2, 8, 64])
    """

    def __init__(self, hidden: int, n: int = 4, *, final_norm: bool = True, out_norm_eps: float = 1e-6,
                 mean: bool = False, device=None):
        super().__init__()
        check_count("MHCSinglePassHead", "hidden", hidden, "the hidden width C")
        check_count("MHCSinglePassHead", "n", n, "the number of streams")
        check_constants("MHCSinglePassHead", out_norm_eps=out_norm_eps)
        self.hidden, self.n, self.mean, self.out_norm_eps = int(hidden), int(n), bool(mean), float(out_norm_eps)
        if final_norm:
            self.norm_weight = nn.Parameter(torch.ones(hidden, device=device, dtype=torch.float32))
        else:
            self.register_parameter("norm_weight", None)

    def forward(self, state) -> Tensor:
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise MHCInputError("MHCSinglePassHead: forward takes the chain state (residual, pre)")
        residual, pre = state
        _check_streams("MHCSinglePassHead", residual, self.n, self.hidden)
        md = _mix_dtype(residual)
        if pre is None and not self.mean:
            raise MHCInputError("MHCSinglePassHead: the chain has no pre yet (no site ran); use mean=True or add a "
                                "site")
        with _autocast_off(residual.device):
            return functional.mhc_head_sp(residual, None if self.mean else _as(pre, md),
                                          out_norm_weight=_as(self.norm_weight, md), out_norm_eps=self.out_norm_eps,
                                          mean=self.mean)

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, n={self.n}, final_norm={self.norm_weight is not None}, mean={self.mean}"
