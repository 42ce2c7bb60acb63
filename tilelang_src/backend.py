"""Registers the TileLang kernels with the core registry.

``OPS`` maps every op served here to its launch wrapper and its config functions
(default and search space, both functions of a :class:`~.common.Shape`). Each op's
registered kernel takes the op's arguments in schema order (as
``mhc_kernels.reference.backend`` maps them to ``torch_ref``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mhc_kernels import recompute
from mhc_kernels.registry import register_kernel

from . import composite, mixes, norm, streaming
from .common import Shape, shape_of, supports_call


@dataclass
class OpDef:
    fn: Callable
    default: Callable[[Shape], dict]
    space: Callable[[Shape], list]
    takes_iters: bool = False  # the config also depends on the Sinkhorn iteration count


def _iters_of(call) -> int:
    names = call.spec.arg_names
    for name in ("iters", "sinkhorn_iters"):
        if name in names:
            return int(call.args[names.index(name)])
    return 20


def _streaming(op, fn):
    return OpDef(fn, lambda s, op=op: streaming.default_config(op, s),
                 lambda s, op=op: streaming.config_space(op, s))


def _mixes(op, fn):
    return OpDef(fn, lambda s, op=op, iters=20: mixes.default_config(op, s, iters),
                 lambda s, op=op, iters=20: mixes.config_space(op, s, iters), takes_iters=True)


def _composite(op, fn):
    return OpDef(fn, lambda s, op=op: composite.default_config(op, s),
                 lambda s, op=op: composite.config_space(op, s))


OPS: dict[str, OpDef] = {
    "mhc_pre": _composite("mhc_pre", composite.mhc_pre_fwd),
    "mhc_pre_bwd": _composite("mhc_pre_bwd", composite.mhc_pre_bwd),
    "mhc_head": _composite("mhc_head", composite.mhc_head_fwd),
    "mhc_head_bwd": _composite("mhc_head_bwd", composite.mhc_head_bwd),
    "post_pre": _composite("post_pre", composite.post_pre_fwd),
    "norm_fn": OpDef(norm.norm_fn_fwd, lambda s: norm.default_config("norm_fn", s),
                     lambda s: norm.config_space("norm_fn", s)),
    "norm_fn_bwd": OpDef(norm.norm_fn_bwd, lambda s: norm.default_config("norm_fn_bwd", s),
                         lambda s: norm.config_space("norm_fn_bwd", s)),
    "split_mixes": _mixes("split_mixes", mixes.split_mixes_fwd),
    "split_mixes_bwd": _mixes("split_mixes_bwd", mixes.split_mixes_bwd),
    "sinkhorn": _mixes("sinkhorn", mixes.sinkhorn_fwd),
    "sinkhorn_bwd": _mixes("sinkhorn_bwd", mixes.sinkhorn_bwd),
    "pre_apply_mix": _streaming("pre_apply_mix", streaming.pre_apply_mix_fwd),
    "pre_apply_mix_bwd": _streaming("pre_apply_mix_bwd", streaming.pre_apply_mix_bwd),
    "post": _streaming("post", streaming.post_fwd),
    "post_bwd": _streaming("post_bwd", streaming.post_bwd),
    "expand": _streaming("expand", streaming.expand_fwd),
    "expand_bwd": _streaming("expand_bwd", streaming.expand_bwd),
}


_SINKHORN_BWD_OPS = ("sinkhorn_bwd", "split_mixes_bwd", "mhc_pre_bwd")


def supports(call):
    """None when the TileLang kernel can serve ``call``, else a one-line reason (the registry falls back)."""
    reason = supports_call(call)
    if reason is None and call.spec.name in _SINKHORN_BWD_OPS:
        reason = mixes.bwd_supported(call.n, _iters_of(call))
    return reason


def _register():
    for op, d in OPS.items():
        if d.takes_iters:
            space = lambda call, d=d: d.space(shape_of(call), iters=_iters_of(call))  # noqa: E731
            default = lambda call, d=d: d.default(shape_of(call), iters=_iters_of(call))  # noqa: E731
        else:
            space = lambda call, d=d: d.space(shape_of(call))  # noqa: E731
            default = lambda call, d=d: d.default(shape_of(call))  # noqa: E731
        register_kernel(op, "tilelang", d.fn, supports=supports, config_space=space, default_config=default)
    # DESIGN 2.7's forward-only multilayer_recompute (op registered by mhc_kernels.recompute), composed
    # from the post and pre_apply_mix kernels writing straight into the per-layer output slices.
    register_kernel("multilayer_recompute", "tilelang",
                    recompute.composed_kernel(streaming.post_fwd, streaming.pre_apply_mix_fwd),
                    supports=supports_call)


_register()
