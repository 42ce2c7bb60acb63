"""mHC inside Hugging Face ``transformers`` models: :func:`to_mhc`, :func:`from_pretrained`, :func:`check_model`.

``to_mhc(model, n=4)`` turns a Llama-style causal LM (``model.model.layers``, each layer with ``self_attn``,
``mlp``, ``input_layernorm``, ``post_attention_layernorm``; ``model.model.norm``) into an mHC model, in place:

* the first decoder layer expands its input, the embedding ``(B, S, C)``, into the ``n`` streams ``(B, S, n, C)``
  (:class:`~mhc_kernels.nn.MHCExpand`, no parameters) -- so the mHC chain starts right after the embedding, and
  ``inputs_embeds`` passed by the caller are expanded the same way;
* each decoder layer's two residuals ``h + attn(norm1(h))`` and ``h + mlp(norm2(h))`` become two
  :class:`~mhc_kernels.nn.MHCSite` (``layer.attn_site``, ``layer.mlp_site``); between layers the hidden state is
  the residual ``(B, S, n, C)`` (single-pass: the chain state ``(residual, pre)``);
* the final norm ``model.model.norm`` first collapses the streams (``norm.mhc_head``: an
  :class:`~mhc_kernels.nn.MHCHead`, or single-pass an :class:`~mhc_kernels.nn.MHCSinglePassHead` without its own
  norm), then applies the model's own RMSNorm, unchanged, so the LM head sees ``(B, S, C)`` as before.

The attention, MLP, embedding, LM head and their weights are untouched (a pretrained model can be converted for
continued training), the KV cache and ``generate()`` work as before (the cache holds keys and values, which
are computed from the collapsed ``(B, S, C)`` sublayer input), and ``gradient_checkpointing_enable()``
checkpoints every mHC decoder layer (the layer's chain state is passed to the checkpoint as positional tensors,
so it works with ``use_reentrant`` True -- the 4.x default -- and False -- the 5.x default).

**Classic mode** (``single_pass=False``): each site is ``mhc_pre -> norm -> sublayer -> mhc_post``, with the
layer's own ``input_layernorm`` / ``post_attention_layernorm`` kept inside the sublayer. Every stock parameter
keeps its name; the mHC parameters are added under ``model.layers.{i}.attn_site.*``, ``...mlp_site.*`` and
``model.norm.mhc_head.*``.

**Single-pass mode** (``single_pass=True``, DeepSeek-V4.1's dataflow, contract §14): a sublayer's input is the
residual collapsed with the *previous* site's ``pre`` (stream 0 at the first site), and the layer's two norms
are **fused into the sites** (``MHCSite(..., single_pass=True, sublayer_norm=True)``): ``input_layernorm.weight``
and ``post_attention_layernorm.weight`` are moved into ``attn_site.out_norm_weight`` and
``mlp_site.out_norm_weight`` (float32) with the norm's own eps (``config.rms_norm_eps``), and the norm modules
become ``nn.Identity``. The fused norm is ``round(u * rsqrt(mean(u^2) + eps) * w)`` on the rounded collapse
``u``; ``LlamaRMSNorm`` rounds before multiplying by ``w`` -- the same in float32 up to rounding, within one
rounding step of the residual dtype in bf16/fp16. Fusing is only done after checking on a probe that the norm
*is* that RMSNorm (a ``(1 + w)`` norm such as Gemma's is refused; pass ``fuse_norms=False`` to keep the norms as
separate modules). The **final norm is kept**, not fused: ``MHCSinglePassHead(final_norm=False)`` collapses
with the last site's ``pre`` (no learned head parameters), then ``model.model.norm`` runs as in the stock model.

**Saving and loading.** :func:`to_mhc` records the structure in ``config.mhc`` (``{"format": 1, "n": ...,
"single_pass": ..., "fuse_norms": ..., the sites' constants}``), which ``save_pretrained`` writes into
``config.json`` with the mHC weights. :func:`from_pretrained` rebuilds the structure from ``config.mhc`` before
the weights load and refuses a checkpoint with missing or unexpected weights. The stock
``LlamaForCausalLM.from_pretrained`` cannot know about mHC: it loads the stock weights, drops the mHC ones with
transformers' "weights not used" warning (single-pass: the fused norms come back as newly initialised ones) and
returns a plain Llama that computes something else. That is detectable -- ``config.mhc`` is still set on it --
and refused downstream: :func:`check_model` and :func:`to_mhc` raise on a model whose config says mHC but
whose layers are plain.

What changes for the caller: ``output_hidden_states=True`` returns the ``n``-stream residual ``(B, S, n, C)``
for every layer output (single-pass: the residual of the chain state), the embedding ``(B, S, C)`` first and the
final normed ``(B, S, C)`` last. The replaced layer forward is Llama's: architectures whose decoder layer does
more (sandwich norms, scaled residuals, parallel attention + MLP) are refused when they carry extra modules, but
a layer that differs only in its ``forward`` (e.g. Granite's ``residual_multiplier``) cannot be detected; it is
tested on ``LlamaForCausalLM`` only (Mistral's and Qwen2/3's layers have the same children and residual dataflow,
but are untested here).

Needs ``transformers`` (``pip install 'mhc-kernels[hf]'``); tested with 4.57 and 5.x.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Any, Optional

import torch
from torch import nn

from .errors import MHCInputError
from .nn import MHCExpand, MHCHead, MHCSinglePassHead, MHCSite
from .validation import check_constants, check_count

try:
    import transformers
    from transformers import PreTrainedModel
except ImportError as _err:  # pragma: no cover - exercised by tests/test_hf.py with transformers hidden
    raise ImportError("mhc_kernels.hf needs Hugging Face transformers (>= 4.57): pip install 'mhc-kernels[hf]'"
                      ) from _err


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


if _version_tuple(transformers.__version__) < (4, 57):
    raise ImportError(f"mhc_kernels.hf needs transformers >= 4.57; found {transformers.__version__}: "
                      "pip install 'mhc-kernels[hf]'")

Tensor = torch.Tensor

__all__ = ["to_mhc", "from_pretrained", "check_model", "is_mhc", "mhc_config", "MHCModelError", "CONFIG_KEY"]

#: the config attribute (and ``config.json`` key) that marks a model as mHC
CONFIG_KEY = "mhc"
FORMAT = 1
LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_SITE_CONSTANTS = ("alpha", "identity_tol", "norm_eps", "pre_eps", "post_mult", "sinkhorn_iters", "sinkhorn_eps")
# cache keyword names of the decoder layers across versions (4.x: past_key_values, 5.x: cache)
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


class MHCModelError(MHCInputError, TypeError):
    """The model cannot be converted or loaded: not a Llama-style ``transformers`` model, already mHC, or an
    mHC checkpoint loaded without its mHC structure. An :class:`MHCInputError` (a ``ValueError``) and a
    ``TypeError``."""


# -- structure checks -------------------------------------------------------------------------------------------
def _decoder(model: nn.Module, owner: str) -> nn.Module:
    """The module holding ``layers`` / ``norm``: ``model.model`` for a ``*ForCausalLM``, ``model`` for a bare
    ``*Model``."""
    if not isinstance(model, PreTrainedModel):
        raise MHCModelError(f"{owner}: expected a transformers PreTrainedModel (e.g. LlamaForCausalLM); got "
                            f"{type(model).__name__}")
    for base in (getattr(model, "model", None), model):
        if isinstance(base, nn.Module) and isinstance(getattr(base, "layers", None), nn.ModuleList):
            if not isinstance(getattr(base, "norm", None), nn.Module):
                raise MHCModelError(f"{owner}: expected a Llama-style model with a final norm `model.model.norm`; "
                                    f"{type(model).__name__} has `layers` but no `norm` module")
            return base
    children = ", ".join(name for name, _ in model.named_children()) or "none"
    raise MHCModelError(f"{owner}: expected a Llama-style transformers model: `model.model.layers` (a ModuleList of "
                        f"decoder layers, each with {', '.join(LAYER_PARTS)}) and `model.model.norm`; "
                        f"{type(model).__name__} has no `model.model.layers` (its children: {children})")


def _check_layer(layer: nn.Module, i: int, C: int, owner: str) -> None:
    names = {name for name, _ in layer.named_children()}
    missing = [p for p in LAYER_PARTS if p not in names]
    extra = sorted(names - set(LAYER_PARTS))
    if missing or extra:
        what = []
        if missing:
            what.append(f"missing {missing}")
        if extra:
            what.append(f"extra modules {extra} (their part of the layer's forward would be lost)")
        raise MHCModelError(f"{owner}: decoder layer {i} ({type(layer).__name__}) is not Llama-like: expected exactly "
                            f"the children {list(LAYER_PARTS)}; {'; '.join(what)}")
    for part in ("input_layernorm", "post_attention_layernorm"):
        w = getattr(getattr(layer, part), "weight", None)
        if not isinstance(w, Tensor) or tuple(w.shape) != (C,):
            got = None if not isinstance(w, Tensor) else tuple(w.shape)
            raise MHCModelError(f"{owner}: decoder layer {i}'s {part} must be an RMSNorm with a weight of shape "
                                f"(hidden_size,) = ({C},); got weight {got}")


def _norm_eps(norm: nn.Module, owner: str) -> float:
    for attr in ("variance_epsilon", "eps"):
        eps = getattr(norm, attr, None)
        if isinstance(eps, (int, float)) and eps > 0:
            return float(eps)
    raise MHCModelError(f"{owner}: cannot fuse {type(norm).__name__} into a single-pass site: it has no positive "
                        "`variance_epsilon`/`eps`; pass fuse_norms=False")


@torch.no_grad()
def _check_plain_rmsnorm(norm: nn.Module, eps: float, where: str, owner: str) -> None:
    """Fusing is exact only for ``w * x / sqrt(mean(x^2) + eps)``; probe the module to make sure."""
    w = norm.weight
    if w.is_meta:
        return
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, w.shape[0], generator=g).to(device=w.device)
    want = w.float() * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    got = norm(x.to(w.dtype)).float()
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-6)
    if not math.isfinite(err) or err > tol * scale:
        raise MHCModelError(f"{owner}: {where} ({type(norm).__name__}) does not compute w * x / rms(x) (max deviation "
                            f"{err:.3g} on a probe), so it cannot be fused into a single-pass site; pass "
                            "fuse_norms=False to keep it as a separate module")


# -- the mHC decoder layer and final norm (dynamic subclasses of the model's own classes) -------------------------
class _MHCDecoderLayer:
    """Mixed in front of the model's decoder-layer class: the layer's forward with both residuals as mHC sites.

    ``forward(hidden_states, **kwargs)``: ``hidden_states`` is the embedding ``(B, S, C)`` at the first layer,
    then the residual ``(B, S, n, C)`` (single-pass: the chain state ``(residual, pre)``); returns the next
    layer's ``hidden_states``. ``kwargs`` (mask, position embeddings, cache, ...) go to ``self_attn`` as in the
    stock layer."""

    # found by transformers' _set_gradient_checkpointing (set per instance by gradient_checkpointing_enable)
    gradient_checkpointing = False
    # the stock GradientCheckpointingLayer (4.x) checkpoints in __call__ with the hidden state as its one
    # positional argument; this layer checkpoints inside forward instead, with its chain state's tensors as
    # positional arguments (a tuple argument would lose its gradient under use_reentrant=True)
    __call__ = nn.Module.__call__

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise TypeError(f"{type(self).__name__}: pass everything but hidden_states by keyword (got {len(args)} "
                            "extra positional arguments)")
        if isinstance(hidden_states, (tuple, list)):
            if len(hidden_states) != 2:
                raise MHCInputError(f"{type(self).__name__}: expected the chain state (residual, pre); got a "
                                    f"sequence of {len(hidden_states)}")
            residual, pre = hidden_states
        else:
            residual, pre = hidden_states, None
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # the recompute would write the cache a second time: run without it, as the stock layers do
            for key in _CACHE_KWARGS:
                if kwargs.get(key) is not None:
                    kwargs[key] = None
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            return self._gradient_checkpointing_func(functools.partial(self._mhc_forward, **kwargs), residual, pre)
        return self._mhc_forward(residual, pre, **kwargs)

    def _mhc_forward(self, residual: Tensor, pre: Optional[Tensor], **kwargs):
        if self.mhc_expand is not None:
            if residual.dim() < 1 or residual.shape[-1] != self.attn_site.hidden or pre is not None:
                raise MHCInputError(f"{type(self).__name__}: the first mHC layer takes the embedding (..., C="
                                    f"{self.attn_site.hidden}); got {tuple(residual.shape)}")
            state = self.mhc_expand(residual)
        elif self.attn_site.single_pass:
            if pre is None:
                raise MHCInputError(f"{type(self).__name__}: single-pass layers after the first take the chain state "
                                    "(residual, pre); got a tensor")
            state = (residual, pre)
        else:
            state = residual

        def attention(h: Tensor) -> Tensor:
            return self.self_attn(hidden_states=self.input_layernorm(h), **kwargs)[0]

        def mlp(h: Tensor) -> Tensor:
            out = self.mlp(self.post_attention_layernorm(h))
            if not isinstance(out, Tensor):
                raise MHCModelError(f"{type(self).__name__}: the mlp must return a tensor (a mixture-of-experts block "
                                    f"returning {type(out).__name__} is not supported)")
            return out

        state = self.attn_site(state, attention)
        return self.mlp_site(state, mlp)


class _MHCFinalNorm:
    """Mixed in front of the model's final-norm class: collapse the streams with ``self.mhc_head``, then the
    stock norm: ``(B, S, n, C)`` (single-pass: ``(residual, pre)``) -> ``(B, S, C)``."""

    def forward(self, hidden_states):
        return super().forward(self.mhc_head(hidden_states))


_CLASSES: dict[tuple[type, type], type] = {}


def _mhc_class(mixin: type, base: type) -> type:
    key = (mixin, base)
    if key not in _CLASSES:
        cls = type(f"MHC{base.__name__}", (mixin, base), {"__module__": __name__, "__doc__": mixin.__doc__})
        # transformers 5.x wraps a GradientCheckpointingLayer subclass's forward in its checkpointing wrapper at
        # class creation; drop the wrapper so the mixin's forward (which checkpoints itself) is the forward
        if "forward" in cls.__dict__:
            del cls.forward
        _CLASSES[key] = cls
    return _CLASSES[key]


# -- the config record --------------------------------------------------------------------------------------------
def mhc_config(obj) -> Optional[dict]:
    """The mHC record ``config.mhc`` of a model, a config, or a saved checkpoint folder (its ``config.json``);
    ``None`` if it is not marked as mHC.

    Example::

        >>> from transformers import LlamaConfig
        >>> mhc_config(LlamaConfig()) is None
        True
    """
    if isinstance(obj, (str, bytes)) or hasattr(obj, "__fspath__"):
        obj = transformers.AutoConfig.from_pretrained(obj)
    config = getattr(obj, "config", obj)
    spec = getattr(config, CONFIG_KEY, None)
    return dict(spec) if isinstance(spec, dict) else None


def _read_spec(config, owner: str) -> dict:
    spec = getattr(config, CONFIG_KEY, None)
    if not isinstance(spec, dict):
        raise MHCModelError(f"{owner}: the config has no `{CONFIG_KEY}` record, so this is not an mHC checkpoint "
                            "(load it with the stock from_pretrained, then call to_mhc)")
    if spec.get("format") != FORMAT:
        raise MHCModelError(f"{owner}: config.{CONFIG_KEY} has format {spec.get('format')!r}; this version of "
                            f"mhc_kernels reads format {FORMAT}")
    missing = [k for k in ("n", "single_pass", "fuse_norms", *_SITE_CONSTANTS) if k not in spec]
    if missing:
        raise MHCModelError(f"{owner}: config.{CONFIG_KEY} lacks {missing}: {spec}")
    return dict(spec)


def is_mhc(model: nn.Module) -> bool:
    """Whether ``model`` has the mHC structure installed (by :func:`to_mhc` or :func:`from_pretrained`).

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> model = LlamaForCausalLM(cfg)
        >>> is_mhc(model), is_mhc(to_mhc(model))
        (False, True)
    """
    return any(isinstance(m, (_MHCDecoderLayer, _MHCFinalNorm)) for m in model.modules())


def check_model(model: nn.Module) -> Optional[dict]:
    """Check that ``model``'s structure matches its config: returns ``config.mhc`` for an mHC model, ``None`` for a
    plain one, and raises :class:`MHCModelError` when the config says mHC but the layers are plain -- an mHC
    checkpoint loaded with the stock ``from_pretrained``, whose mHC weights were dropped (load it with
    :func:`from_pretrained`) -- or the other way round.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> check_model(to_mhc(LlamaForCausalLM(cfg), n=2))["n"]
        2
    """
    spec = mhc_config(model)
    installed = is_mhc(model)
    if spec is not None and not installed:
        raise MHCModelError(f"check_model: {type(model).__name__}'s config marks it as an mHC model "
                            f"(config.{CONFIG_KEY} = {spec}) but its layers are plain: it was probably loaded with "
                            "the stock from_pretrained, which drops the mHC weights; load it with "
                            "mhc_kernels.hf.from_pretrained")
    if spec is None and installed:
        raise MHCModelError(f"check_model: {type(model).__name__} has mHC layers but no config.{CONFIG_KEY} record; "
                            "save_pretrained would write a checkpoint that cannot be reloaded")
    return spec


# -- conversion ---------------------------------------------------------------------------------------------------
def _install(model: PreTrainedModel, spec: dict, owner: str) -> None:
    """Build the mHC structure of ``spec`` into ``model`` (checked Llama-like); the new sites are initialised
    as in :mod:`mhc_kernels.nn` (single-pass fused norms: copied from the model's norms)."""
    base = _decoder(model, owner)
    C = int(model.config.hidden_size)
    n, sp, fuse = int(spec["n"]), bool(spec["single_pass"]), bool(spec["fuse_norms"])
    layers = list(base.layers)
    if not layers:
        raise MHCModelError(f"{owner}: the model has no decoder layers")
    for i, layer in enumerate(layers):
        _check_layer(layer, i, C, owner)
    site_kw = {k: spec[k] for k in _SITE_CONSTANTS}
    device = base.norm.weight.device if isinstance(getattr(base.norm, "weight", None), Tensor) else None
    fused = []
    if sp and fuse:
        for i, layer in enumerate(layers):
            for part in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, part)
                eps = _norm_eps(norm, owner)
                _check_plain_rmsnorm(norm, eps, f"decoder layer {i}'s {part}", owner)
                fused.append((i, part, eps))
    for i, layer in enumerate(layers):
        sites = {}
        for site_name, part in (("attn_site", "input_layernorm"), ("mlp_site", "post_attention_layernorm")):
            norm = getattr(layer, part)
            if sp and fuse:
                site = MHCSite(C, n, single_pass=True, sublayer_norm=True, out_norm_eps=_norm_eps(norm, owner),
                               device=device, **site_kw)
                with torch.no_grad():
                    site.out_norm_weight.copy_(norm.weight.detach().float())
            else:
                site = MHCSite(C, n, single_pass=sp, device=device, **site_kw)
            sites[site_name] = site
        layer.__class__ = _mhc_class(_MHCDecoderLayer, type(layer))
        layer.attn_site, layer.mlp_site = sites["attn_site"], sites["mlp_site"]
        layer.register_module("mhc_expand", MHCExpand(n, single_pass=sp) if i == 0 else None)
        if sp and fuse:
            layer.input_layernorm, layer.post_attention_layernorm = nn.Identity(), nn.Identity()
    base.norm.__class__ = _mhc_class(_MHCFinalNorm, type(base.norm))
    base.norm.mhc_head = (MHCSinglePassHead(C, n, final_norm=False, device=device) if sp
                          else MHCHead(C, n, alpha=spec["alpha"], norm_eps=spec["norm_eps"], pre_eps=spec["pre_eps"],
                                       device=device))
    _keep_layers_whole(model, sorted({type(layer).__name__ for layer in layers}))
    model.config.mhc = spec


def _keep_layers_whole(model: nn.Module, names: list) -> None:
    """Add the mHC layer classes to ``_no_split_modules`` wherever the stock model lists its layer class, so a
    ``device_map`` never splits an mHC decoder layer (its sites and sublayers) across devices."""
    for m in model.modules():
        current = getattr(m, "_no_split_modules", None) if isinstance(m, PreTrainedModel) else None
        if current:
            m._no_split_modules = type(current)([*current, *(x for x in names if x not in current)])


def _own_config(model: nn.Module) -> None:
    """Give ``model`` (and every submodule that shares it) a copy of its config, so that marking it as mHC does
    not mark other models built from the same config object."""
    old = model.config
    new = copy.deepcopy(old)
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new


def to_mhc(model: PreTrainedModel, n: int = 4, single_pass: bool = False, *, fuse_norms: bool = True,
           alpha: float = 0.01, identity_tol: float = 1e-2, norm_eps: float = 1e-6, pre_eps: float = 1e-6,
           post_mult: float = 2.0, sinkhorn_iters: int = 20, sinkhorn_eps: float = 1e-6) -> PreTrainedModel:
    """Rewrap every decoder layer's attention and MLP residuals of a Llama-style ``transformers`` model with mHC
    sites, in place, and record the structure in ``model.config.mhc``; returns ``model``.

    The model keeps its interface: ``input_ids (B, S)`` -> ``logits (B, S, vocab)``, ``generate()``, the KV
    cache, ``gradient_checkpointing_enable()``, ``save_pretrained`` (reload with :func:`from_pretrained`).
    Between decoder layers the hidden state is the ``n``-stream residual ``(B, S, n, C)`` (single-pass: the
    chain state ``(residual, pre)``); the module docstring lists what is added and what is fused.

    Args:
        model: a ``*ForCausalLM`` (or bare ``*Model``) with ``model.model.layers``, each layer with exactly the
            children ``self_attn``, ``mlp``, ``input_layernorm``, ``post_attention_layernorm``, and
            ``model.model.norm`` -- Llama (tested); Mistral and Qwen2/3 share that layout (untested).
        n: the number of residual streams.
        single_pass: DeepSeek-V4.1's single-pass dataflow (each sublayer input collapsed with the previous site's
            pre; :class:`~mhc_kernels.nn.MHCSinglePassHead` at the end).
        fuse_norms: (single-pass) move the layers' two RMSNorms into the sites (``sublayer_norm=True``); False
            keeps them as separate modules in front of the sublayers.
        alpha, identity_tol, norm_eps, pre_eps, post_mult, sinkhorn_iters, sinkhorn_eps: the sites' (and the
            classic head's) constants, as :class:`~mhc_kernels.nn.MHCSite`.

    At initialisation the model computes what the stock model computes up to the sites' ~1% perturbations.

    Refuses (:class:`MHCModelError`, both a ``ValueError`` and a ``TypeError``): a model that is not Llama-like
    (naming what was expected and what was found), a model that is already mHC (calling ``to_mhc`` twice), a
    model whose config says mHC but whose layers are plain (an mHC checkpoint loaded with the stock
    ``from_pretrained``), and with ``fuse_norms`` a norm that is not a plain RMSNorm; bad ``n`` or constants
    raise :class:`~mhc_kernels.errors.MHCInputError`.

    Example::

        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> model = to_mhc(LlamaForCausalLM(cfg), n=4)
        >>> model(torch.randint(0, 64, (2, 5))).logits.shape
        torch.Size([2, 5, 64])
        >>> model.config.mhc["n"], type(model.model.layers[0]).__name__
        (4, 'MHCLlamaDecoderLayer')
    """
    owner = "to_mhc"
    _decoder(model, owner)
    if is_mhc(model):
        raise MHCModelError(f"{owner}: {type(model).__name__} is already an mHC model (config.{CONFIG_KEY} = "
                            f"{mhc_config(model)}); to_mhc converts a plain model once")
    check_model(model)  # config says mHC but plain layers: a stock-loaded mHC checkpoint
    check_count(owner, "n", n, "the number of streams")
    if not isinstance(single_pass, bool) or not isinstance(fuse_norms, bool):
        raise MHCInputError(f"{owner}: single_pass and fuse_norms must be bools; got {single_pass!r}, {fuse_norms!r}")
    check_constants(owner, norm_eps=norm_eps, pre_eps=pre_eps, post_mult=post_mult, sinkhorn_iters=sinkhorn_iters,
                    sinkhorn_eps=sinkhorn_eps)
    spec = {"format": FORMAT, "n": int(n), "single_pass": single_pass, "fuse_norms": bool(single_pass and fuse_norms),
            "alpha": float(alpha), "identity_tol": float(identity_tol), "norm_eps": float(norm_eps),
            "pre_eps": float(pre_eps), "post_mult": float(post_mult), "sinkhorn_iters": int(sinkhorn_iters),
            "sinkhorn_eps": float(sinkhorn_eps)}
    _own_config(model)
    _install(model, spec, owner)
    return model


# -- loading ------------------------------------------------------------------------------------------------------
_LOADERS: dict[type, type] = {}
_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "trust_remote_code", "subfolder")


def _loading_class(model_class: type) -> type:
    """A subclass of ``model_class`` whose ``__init__`` builds the mHC structure of ``config.mhc``, so that
    transformers' own loading (dtype, device map, shards, tied weights) fills the mHC weights too."""
    if model_class not in _LOADERS:
        def __init__(self, config, *args, **kwargs):
            model_class.__init__(self, config, *args, **kwargs)
            _install(self, _read_spec(config, "from_pretrained"), "from_pretrained")

        _LOADERS[model_class] = type(model_class.__name__, (model_class,),
                                     {"__init__": __init__, "__module__": model_class.__module__})
    return _LOADERS[model_class]


def _resolve_class(config, owner: str) -> type:
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):
            return cls
    try:
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as err:
        raise MHCModelError(f"{owner}: cannot tell the model class from the config ({type(config).__name__}, "
                            f"architectures={getattr(config, 'architectures', None)}); pass model_class=") from err


def from_pretrained(path, model_class: Optional[type] = None, **kwargs: Any):
    """Load an mHC checkpoint written by ``save_pretrained`` of a :func:`to_mhc` model: the structure is rebuilt
    from ``config.mhc`` before the weights load, through ``model_class.from_pretrained`` (so ``dtype=``,
    ``device_map=`` and the other keyword arguments work as there; the mHC parameters stay float32).

    Args:
        path: a checkpoint folder (or hub id).
        model_class: the stock class, e.g. ``LlamaForCausalLM``; by default the first of ``config.architectures``
            found in ``transformers``, else ``AutoModelForCausalLM``'s class for the config.
        **kwargs: passed to ``model_class.from_pretrained`` (``output_loading_info=True`` returns ``(model,
            info)`` as there).

    Returns the model, of class ``model_class``, with the mHC structure (``is_mhc(model)``).

    Refuses (:class:`MHCModelError`): a checkpoint without ``config.mhc`` (a plain checkpoint: use the stock
    ``from_pretrained`` and :func:`to_mhc`), an unknown record format, and a checkpoint whose weights do not
    match the rebuilt structure (missing, unexpected or mismatched weights -- nothing is left at a random
    initialisation silently).

    Example::

        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=64)
        >>> model = to_mhc(LlamaForCausalLM(cfg), n=2)
        >>> path = tempfile.mkdtemp()
        >>> model.save_pretrained(path)
        >>> from_pretrained(path).config.mhc["n"]
        2
    """
    owner = "from_pretrained"
    config = kwargs.pop("config", None)
    if config is None:
        config = transformers.AutoConfig.from_pretrained(path, **{k: kwargs[k] for k in _CONFIG_KWARGS
                                                                  if k in kwargs})
    _read_spec(config, owner)
    if model_class is None:
        model_class = _resolve_class(config, owner)
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise MHCModelError(f"{owner}: model_class must be a transformers PreTrainedModel class; got {model_class!r}")
    want_info = kwargs.pop("output_loading_info", False)
    model, info = _loading_class(model_class).from_pretrained(path, config=config, output_loading_info=True,
                                                              **kwargs)
    model.__class__ = model_class
    bad = {k: sorted(v) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := info.get(k))}
    if bad:
        raise MHCModelError(f"{owner}: the checkpoint at {path} does not match the mHC structure of its config "
                            f"(config.{CONFIG_KEY} = {config.mhc}): {bad}")
    return (model, info) if want_info else model
