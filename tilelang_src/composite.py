"""The composite ops (``mhc_pre``, ``mhc_head``, ``post_pre``) built from the TileLang kernels.

``mhc_pre`` = the projection main loop writing split partials -> the fused tail kernel
(split-K reduce, rstd, split_mixes and the Sinkhorn on one warp beside the collapse on
the others; ``fused.py``): two launches, the residual read twice.
``post_pre`` = ``post`` fused into the projection's main loop (``fused.post_project``: the
new residual written once, projected from the staged tile) -> the same fused tail (which
reads the new residual back once for the collapse); with a tensor-core projection config,
``post`` -> ``mhc_pre``. ``mhc_head`` = ``norm_fn`` -> a tiny
elementwise sigmoid on the ``(T, n)`` mixes (torch) -> ``pre_apply_mix``.

Backward is where fusion matters for rounding: the residual gradient has up to three
terms (the collapse's ``w (x) g``, the projection's term and an incoming residual
gradient); they are added in float32 inside the projection's ``d_x`` kernel and
rounded once, as the contract requires. Cross-token sums (``d_scale``, ``d_base``,
``d_fn``) go through per-block partials summed in a fixed order.
"""

import torch

from . import fused as _fused
from . import mixes as _mixes
from . import norm as _norm
from . import streaming as _streaming
from .common import Shape


def default_config(op: str, s: Shape) -> dict:
    """Composites take the union of their parts' configs (keys prefixed by part where they clash)."""
    cfg = {}
    if op in ("mhc_pre", "post_pre"):
        cfg.update(_norm.default_config("norm_fn", s))
        cfg.update(_fused.default_tail_config(s))
        if op == "post_pre":
            cfg.update({f"post_{k}": v for k, v in _streaming.default_config("post", s).items()})
    elif op == "mhc_head":
        cfg.update(_norm.default_config("norm_fn", s))
        cfg.update({f"apply_{k}": v for k, v in _streaming.default_config("pre_apply_mix", s).items()})
    else:  # backward composites
        cfg.update(_norm.default_config("norm_fn_bwd", s))
        cfg.update({f"apply_{k}": v for k, v in _streaming.default_config("pre_apply_mix_bwd", s).items()})
    if op == "mhc_pre_bwd":
        cfg.update({f"split_{k}": v for k, v in _mixes.default_config("split_mixes_bwd", s).items()})
    return cfg


def config_space(op: str, s: Shape) -> list[dict]:
    """The default, plus (mhc_pre, post_pre) the fused tail's streaming layouts at the default projection;
    the other parts are tuned as their own ops."""
    d = default_config(op, s)
    out = [d]
    if op in ("mhc_pre", "post_pre"):
        for c in _streaming.config_space("pre_apply_mix", s):
            cand = dict(d, **{f"tail_{k}": v for k, v in c.items()})
            if cand not in out:
                out.append(cand)
    return out


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
    """-> (layer_input, post_mix, comb_mix, mixes, rstd): the projection's split partials, then the fused
    tail (reduce, split, Sinkhorn beside the collapse; ``fused.py``)."""
    part_mix, part_sq = _norm.norm_fn_partials(residual, fn, norm_weight, config=_plain(config))
    return _fused.mhc_pre_tail(part_mix, part_sq, scale, base, residual, norm_eps, pre_eps, post_mult, iters,
                               sinkhorn_eps, config=config)


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
    """-> (new_residual, layer_input, post_mix, comb_mix, mixes, rstd) of the next sublayer.

    Two launches with the default ("fma") projection: post fused into the projection's main loop (the new
    residual written once and projected from registers), then mhc_pre's fused tail (the collapse reads the
    new residual back once). A tensor-core projection config runs post, then mhc_pre."""
    fused = _fused.post_project(layer_output, residual, post_mix, comb_mix, fn, norm_weight, config=_plain(config))
    if fused is None:
        new_residual = _streaming.post_fwd(layer_output, residual, post_mix, comb_mix, config=_part(config, "post_"))
        return (new_residual,) + mhc_pre_fwd(new_residual, fn, scale, base, norm_weight, norm_eps, pre_eps,
                                             post_mult, iters, sinkhorn_eps, config=config)
    new_residual, part_mix, part_sq = fused
    return (new_residual,) + _fused.mhc_pre_tail(part_mix, part_sq, scale, base, new_residual, norm_eps, pre_eps,
                                                 post_mult, iters, sinkhorn_eps, config=config, op="post_pre")
