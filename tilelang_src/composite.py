"""The composite ops (``mhc_pre``, ``mhc_head``, ``post_pre``) built from the TileLang kernels.

Not single fused kernels: each composite launches the op kernels in sequence --
``mhc_pre`` = ``norm_fn`` (1 or 2 launches) -> ``split_mixes`` -> ``pre_apply_mix``,
``post_pre`` = ``post`` -> ``mhc_pre`` (the new residual is written once and read
back by the projection and the collapse), ``mhc_head`` = ``norm_fn`` -> a tiny
elementwise sigmoid on the ``(T, n)`` mixes (torch) -> ``pre_apply_mix``.

Backward is where fusion matters for rounding: the residual gradient has up to three
terms (the collapse's ``w (x) g``, the projection's term and an incoming residual
gradient); they are added in float32 inside the projection's ``d_x`` kernel and
rounded once, as the contract requires. Cross-token sums (``d_scale``, ``d_base``,
``d_fn``) go through per-block partials summed in a fixed order.
"""

import torch

from . import mixes as _mixes
from . import norm as _norm
from . import streaming as _streaming
from .common import Shape


def default_config(op: str, s: Shape) -> dict:
    """Composites take the union of their parts' configs (keys prefixed by part where they clash)."""
    cfg = {}
    if op in ("mhc_pre", "post_pre", "mhc_head"):
        cfg.update(_norm.default_config("norm_fn", s))
        cfg.update({f"apply_{k}": v for k, v in _streaming.default_config("pre_apply_mix", s).items()})
        if op == "post_pre":
            cfg.update({f"post_{k}": v for k, v in _streaming.default_config("post", s).items()})
    else:  # backward composites
        cfg.update(_norm.default_config("norm_fn_bwd", s))
        cfg.update({f"apply_{k}": v for k, v in _streaming.default_config("pre_apply_mix_bwd", s).items()})
    if op in ("mhc_pre", "post_pre"):
        cfg.update({f"split_{k}": v for k, v in _mixes.default_config("split_mixes", s).items()})
    if op == "mhc_pre_bwd":
        cfg.update({f"split_{k}": v for k, v in _mixes.default_config("split_mixes_bwd", s).items()})
    return cfg


def config_space(op: str, s: Shape) -> list[dict]:
    return [default_config(op, s)]


def _part(cfg, prefix):
    if cfg is None:
        return None
    return {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)} or None


def _plain(cfg):
    if cfg is None:
        return None
    return {k: v for k, v in cfg.items() if not k.startswith(("apply_", "split_", "post_"))} or None


def mhc_pre_fwd(residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult, iters, sinkhorn_eps, *,
                config=None):
    """-> (layer_input, post_mix, comb_mix, mixes, rstd)."""
    mixes, rstd = _norm.norm_fn_fwd(residual, fn, norm_weight, norm_eps, config=_plain(config))
    pre, post, comb = _mixes.split_mixes_fwd(mixes, scale, base, pre_eps, post_mult, iters, sinkhorn_eps,
                                             config=_part(config, "split_"))
    layer_input = _streaming.pre_apply_mix_fwd(residual, pre, config=_part(config, "apply_"))
    return layer_input, post, comb, mixes, rstd


def mhc_pre_bwd(grad_layer_input, grad_post, grad_comb, residual, fn, scale, base, norm_weight, mixes, rstd,
                grad_residual, pre_eps, post_mult, iters, sinkhorn_eps, *, config=None):
    """-> (d_residual, d_fn_eff, d_scale, d_base)."""
    n = residual.shape[1]
    pre = torch.sigmoid(torch.addcmul(base[:n], mixes[:, :n], scale[0])) + pre_eps
    _, d_pre = _streaming.pre_apply_mix_bwd(grad_layer_input, residual, pre, config=_part(config, "apply_"),
                                            write_dx=False)
    d_mixes, d_scale, d_base = _mixes.split_mixes_bwd(d_pre, grad_post, grad_comb, mixes, scale, base, post_mult,
                                                      iters, sinkhorn_eps, config=_part(config, "split_"))
    d_res, d_fn = _norm.norm_fn_bwd_fused(d_mixes, residual, fn, norm_weight, mixes, rstd, apply_w=pre,
                                          apply_grad=grad_layer_input, grad_residual=grad_residual,
                                          config=_plain(config))
    return d_res, d_fn, d_scale, d_base


def mhc_head_fwd(residual, fn, scale, base, norm_weight, norm_eps, pre_eps, *, config=None):
    """-> (out, mixes (T, n), rstd)."""
    mixes, rstd = _norm.norm_fn_fwd(residual, fn, norm_weight, norm_eps, config=_plain(config))
    w = torch.sigmoid(torch.addcmul(base, mixes, scale)) + pre_eps
    out = _streaming.pre_apply_mix_fwd(residual, w, config=_part(config, "apply_"))
    return out, mixes, rstd


def mhc_head_bwd(grad, residual, fn, scale, base, norm_weight, mixes, rstd, pre_eps, *, config=None):
    """-> (d_residual, d_fn_eff, d_scale (1,), d_base (n,))."""
    z = torch.addcmul(base, mixes, scale)
    w = torch.sigmoid(z) + pre_eps
    _, d_w = _streaming.pre_apply_mix_bwd(grad, residual, w, config=_part(config, "apply_"), write_dx=False)
    d_z = d_w * (torch.sigmoid(z) * torch.sigmoid(-z))
    d_res, d_fn = _norm.norm_fn_bwd_fused(d_z * scale, residual, fn, norm_weight, mixes, rstd, apply_w=w,
                                          apply_grad=grad, config=_plain(config))
    return d_res, d_fn, (d_z * mixes).sum().reshape(1), d_z.sum(0)


def post_pre_fwd(layer_output, residual, post_mix, comb_mix, fn, scale, base, norm_weight, norm_eps, pre_eps,
                 post_mult, iters, sinkhorn_eps, *, config=None):
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd) of the next sublayer."""
    new_residual = _streaming.post_fwd(layer_output, residual, post_mix, comb_mix, config=_part(config, "post_"))
    return (new_residual,) + mhc_pre_fwd(new_residual, fn, scale, base, norm_weight, norm_eps, pre_eps, post_mult,
                                         iters, sinkhorn_eps, config=config)
