"""Registers the TileLang kernels with the core registry.

``OPS`` maps every op with a TileLang kernel of its own to its launch wrapper and its config
functions (default and search space, both functions of a :class:`~.common.Shape`): the
primitives, and the two composites this backend fuses -- ``mhc_pre`` (the projection, then one
tail kernel running the Sinkhorn beside the collapse and, with the sublayer's norm, the norm) and
``post_pre`` (post inside the projection's main loop, then the same tail), from ``fused.py``: two
launches each, as the single-pass ``mhc_pre_sp`` / ``post_pre_sp``. Every other composite
(``mhc_pre_bwd``, ``mhc_head`` and its backward, ``multilayer_recompute``) is the shared one
of :mod:`mhc_kernels.composite` over these kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mhc_kernels import composite
from mhc_kernels.registry import Kernel, register_kernel

from . import fp8, fused, mixes, norm, streaming
from .common import shape_of, supports_call


@dataclass
class OpDef:
    fn: Callable
    default: Callable[..., dict]   # (Shape[, iters]) -> config
    space: Callable[..., list]     # (Shape[, iters]) -> configs
    takes_iters: bool = False      # the config also depends on the Sinkhorn iteration count


def _streaming(op, fn):
    return OpDef(fn, lambda s, op=op: streaming.default_config(op, s), lambda s, op=op: streaming.config_space(op, s))


def _mixes(op, fn):
    return OpDef(fn, lambda s, iters=20, op=op: mixes.default_config(op, s, iters),
                 lambda s, iters=20, op=op: mixes.config_space(op, s, iters), takes_iters=True)


def _norm(op, fn):
    return OpDef(fn, lambda s, op=op: norm.default_config(op, s), lambda s, op=op: norm.config_space(op, s))


def _collapse_norm(fn):
    return OpDef(fn, lambda s: {"pre_apply_mix": streaming.default_config("pre_apply_mix", s),
                                "collapse_norm": streaming.default_config("collapse_norm", s)},
                 lambda s: [{"pre_apply_mix": streaming.default_config("pre_apply_mix", s), "collapse_norm": c}
                            for c in streaming.config_space("collapse_norm", s)])


def _fused(op, fn):
    return OpDef(fn, lambda s, op=op: fused.default_config(op, s), lambda s, op=op: fused.config_space(op, s))


OPS: dict[str, OpDef] = {
    "norm_fn": _norm("norm_fn", norm.norm_fn_fwd),
    "norm_fn_bwd": _norm("norm_fn_bwd", norm.norm_fn_bwd),
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
    "quantize_fp8": OpDef(fp8.quantize_fp8_fwd, lambda s: fp8.default_config("quantize_fp8", s),
                          lambda s: fp8.config_space("quantize_fp8", s)),
    # the composites this backend fuses (overrides of mhc_kernels.composite's)
    "mhc_pre": _fused("mhc_pre", fused.mhc_pre_fwd),
    "post_pre": _fused("post_pre", fused.post_pre_fwd),
    "mhc_head_sp": _collapse_norm(streaming.collapse_norm_fwd),   # the collapse and its RMSNorm in one kernel
    "mhc_pre_sp": _fused("mhc_pre_sp", fused.mhc_pre_sp_fwd),
    "post_pre_sp": _fused("post_pre_sp", fused.post_pre_sp_fwd),
}

_SINKHORN_BWD_OPS = ("sinkhorn_bwd", "split_mixes_bwd")


def supports(call):
    """None when the TileLang kernel can serve ``call``, else a one-line reason (the registry falls back)."""
    reason = supports_call(call)
    if reason is None and call.spec.name in _SINKHORN_BWD_OPS:
        reason = mixes.bwd_supported(call.n, call.iters or 20)
    return reason


def _kernel_args(op: str, d: OpDef) -> dict:
    if d.takes_iters:
        return dict(config_space=lambda call: d.space(shape_of(call), iters=call.iters or 20),
                    default_config=lambda call: d.default(shape_of(call), iters=call.iters or 20),
                    check_config=lambda call, cfg: mixes.check_config(op, call.n, call.iters or 20, cfg))
    return dict(config_space=lambda call: d.space(shape_of(call)),
                default_config=lambda call: d.default(shape_of(call)))


def _register():
    overrides = {}
    for op, d in OPS.items():
        kw = dict(fn=d.fn, supports=supports, **_kernel_args(op, d))
        if op in composite.COMPOSITES:
            overrides[op] = kw
        else:
            register_kernel(op, "tilelang", **kw)
    swg = OPS["pre_apply_mix_bwd"]
    composite.register_composites("tilelang", overrides=overrides, extra_parts={composite.STREAM_WEIGHT_GRAD: Kernel(
        composite.STREAM_WEIGHT_GRAD, "tilelang", streaming.stream_weight_grad, supports=supports,
        **_kernel_args("pre_apply_mix_bwd", swg))})


_register()
